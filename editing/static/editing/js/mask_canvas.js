// Mask painting over a template image.
//
// The mask canvas has the template's natural size, so one canvas pixel is one image pixel; zoom
// only changes its CSS size. Painted pixels are opaque in the canvas's alpha channel, and the
// exported PNG is white where alpha >= 128 and black elsewhere.

const PAINT_RGB = [255, 0, 102];
const PAINT_COLOR = `rgb(${PAINT_RGB.join(", ")})`;
const ALPHA_THRESHOLD = 128;
// Undo snapshots keep the alpha channel only: width * height bytes each.
const UNDO_BYTES_BUDGET = 256 * 1024 * 1024;
const UNDO_MAX_DEPTH = 50;
const ZOOM_STEPS = [0.05, 0.1, 0.125, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1, 1.5, 2, 3, 4, 6, 8];

export const TOOLS = ["brush", "eraser", "rectangle"];

export class MaskCanvas {
  /**
   * @param {object} elements stage, image, canvas, scroller, cursor and rectanglePreview elements.
   * @param {function} onChange called after every finished edit, zoom or history change.
   */
  constructor(elements, onChange = () => {}) {
    this.stage = elements.stage;
    this.image = elements.image;
    this.canvas = elements.canvas;
    this.scroller = elements.scroller;
    this.cursor = elements.cursor;
    this.rectanglePreview = elements.rectanglePreview;
    this.onChange = onChange;
    this.context = this.canvas.getContext("2d", { willReadFrequently: true });
    this.tool = "brush";
    this.brushSize = 48; // diameter in image pixels
    this.zoom = 1;
    this.undoStack = [];
    this.redoStack = [];
    this.stroke = null;
    this.loaded = false;
    this.bindPointer();
  }

  get width() {
    return this.canvas.width;
  }

  get height() {
    return this.canvas.height;
  }

  /** Show an image of the given natural size and start an empty mask over it. */
  async load(url, width, height) {
    this.loaded = false;
    this.image.src = url;
    await this.image.decode();
    this.canvas.width = width;
    this.canvas.height = height;
    this.undoStack = [];
    this.redoStack = [];
    this.context.clearRect(0, 0, width, height);
    this.stage.hidden = false;
    this.loaded = true;
    this.zoomToFit();
  }

  /** Replace the mask with a stored mask PNG: bright pixels become painted. */
  async loadMask(url) {
    const source = new Image();
    source.src = url;
    await source.decode();
    if (source.naturalWidth !== this.width || source.naturalHeight !== this.height) {
      throw new Error(`mask is ${source.naturalWidth}x${source.naturalHeight}, image is ${this.width}x${this.height}`);
    }
    const scratch = document.createElement("canvas");
    scratch.width = this.width;
    scratch.height = this.height;
    const scratchContext = scratch.getContext("2d", { willReadFrequently: true });
    scratchContext.drawImage(source, 0, 0);
    const pixels = scratchContext.getImageData(0, 0, this.width, this.height).data;
    const alpha = new Uint8ClampedArray(this.width * this.height);
    for (let i = 0; i < alpha.length; i++) alpha[i] = pixels[i * 4];
    this.pushUndo();
    this.writeAlpha(alpha);
    this.changed();
  }

  /** Copy the mask and its undo and redo history for restore(), or return null before an image is loaded. */
  snapshot() {
    if (!this.loaded) return null;
    return {
      width: this.width,
      height: this.height,
      alpha: this.readAlpha(),
      undoStack: this.undoStack,
      redoStack: this.redoStack,
    };
  }

  /** Restore a mask from snapshot(). Returns false, changing nothing, when its size differs from the loaded image. */
  restore(snapshot) {
    if (!this.loaded || snapshot.width !== this.width || snapshot.height !== this.height) return false;
    this.writeAlpha(snapshot.alpha);
    this.undoStack = snapshot.undoStack;
    this.redoStack = snapshot.redoStack;
    this.changed();
    return true;
  }

  setTool(tool) {
    if (!TOOLS.includes(tool)) throw new Error(`unknown tool ${tool}; use one of ${TOOLS.join(", ")}`);
    this.tool = tool;
    this.cursor.hidden = true;
  }

  setBrushSize(size) {
    this.brushSize = Math.max(1, Math.round(size));
    this.updateCursorSize();
  }

  // --- Editing commands; each one can be undone.

  clear() {
    if (!this.loaded) return;
    this.pushUndo();
    this.context.clearRect(0, 0, this.width, this.height);
    this.changed();
  }

  invert() {
    if (!this.loaded) return;
    this.pushUndo();
    const alpha = this.readAlpha();
    for (let i = 0; i < alpha.length; i++) alpha[i] = 255 - alpha[i];
    this.writeAlpha(alpha);
    this.changed();
  }

  undo() {
    if (!this.undoStack.length) return;
    this.redoStack.push(this.readAlpha());
    this.writeAlpha(this.undoStack.pop());
    this.changed();
  }

  redo() {
    if (!this.redoStack.length) return;
    this.undoStack.push(this.readAlpha());
    this.writeAlpha(this.redoStack.pop());
    this.changed();
  }

  get canUndo() {
    return this.undoStack.length > 0;
  }

  get canRedo() {
    return this.redoStack.length > 0;
  }

  // --- Zoom.

  setZoom(zoom) {
    if (!this.loaded) return;
    this.zoom = Math.min(ZOOM_STEPS[ZOOM_STEPS.length - 1], Math.max(ZOOM_STEPS[0], zoom));
    this.stage.style.width = `${Math.round(this.width * this.zoom)}px`;
    this.stage.style.height = `${Math.round(this.height * this.zoom)}px`;
    // From 200% on, image pixels are drawn as sharp squares, so the mask's pixels stay visible.
    this.stage.classList.toggle("enlarged", this.zoom >= 2);
    this.updateCursorSize();
    this.onChange();
  }

  zoomIn() {
    const next = ZOOM_STEPS.find((step) => step > this.zoom + 1e-6);
    this.setZoom(next ?? this.zoom);
  }

  zoomOut() {
    const previous = [...ZOOM_STEPS].reverse().find((step) => step < this.zoom - 1e-6);
    this.setZoom(previous ?? this.zoom);
  }

  /** Fit the whole image into the visible area, enlarging a small image up to the maximum zoom. */
  zoomToFit() {
    const availableWidth = Math.max(50, this.scroller.clientWidth - 4);
    const availableHeight = Math.max(50, window.innerHeight * 0.7);
    this.setZoom(Math.min(availableWidth / this.width, availableHeight / this.height));
  }

  // --- Reading the mask.

  /** Return the fraction of image pixels in the mask, 0..1. */
  coverage() {
    if (!this.loaded) return 0;
    const alpha = this.readAlpha();
    let painted = 0;
    for (let i = 0; i < alpha.length; i++) if (alpha[i] >= ALPHA_THRESHOLD) painted++;
    return painted / alpha.length;
  }

  /** Encode the mask at full image resolution: white = edit, black = keep. */
  toPngBlob() {
    const alpha = this.readAlpha();
    const output = new ImageData(this.width, this.height);
    for (let i = 0; i < alpha.length; i++) {
      const value = alpha[i] >= ALPHA_THRESHOLD ? 255 : 0;
      output.data[i * 4] = value;
      output.data[i * 4 + 1] = value;
      output.data[i * 4 + 2] = value;
      output.data[i * 4 + 3] = 255;
    }
    const scratch = document.createElement("canvas");
    scratch.width = this.width;
    scratch.height = this.height;
    scratch.getContext("2d").putImageData(output, 0, 0);
    return new Promise((resolve, reject) => {
      scratch.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("PNG encoding failed"))), "image/png");
    });
  }

  // --- Internals.

  readAlpha() {
    const pixels = this.context.getImageData(0, 0, this.width, this.height).data;
    const alpha = new Uint8ClampedArray(this.width * this.height);
    for (let i = 0; i < alpha.length; i++) alpha[i] = pixels[i * 4 + 3];
    return alpha;
  }

  writeAlpha(alpha) {
    const image = new ImageData(this.width, this.height);
    // The canvas shows the paint color at the stage's CSS opacity.
    for (let i = 0; i < alpha.length; i++) {
      image.data[i * 4] = PAINT_RGB[0];
      image.data[i * 4 + 1] = PAINT_RGB[1];
      image.data[i * 4 + 2] = PAINT_RGB[2];
      image.data[i * 4 + 3] = alpha[i];
    }
    this.context.putImageData(image, 0, 0);
  }

  pushUndo() {
    const depth = Math.max(1, Math.min(UNDO_MAX_DEPTH, Math.floor(UNDO_BYTES_BUDGET / (this.width * this.height))));
    this.undoStack.push(this.readAlpha());
    while (this.undoStack.length > depth) this.undoStack.shift();
    this.redoStack = [];
  }

  changed() {
    this.onChange();
  }

  /** Map a pointer event to image pixel coordinates. */
  imagePoint(event) {
    const box = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * this.width) / box.width,
      y: ((event.clientY - box.top) * this.height) / box.height,
    };
  }

  bindPointer() {
    this.canvas.addEventListener("pointerdown", (event) => this.pointerDown(event));
    this.canvas.addEventListener("pointermove", (event) => this.pointerMove(event));
    this.canvas.addEventListener("pointerup", (event) => this.pointerUp(event));
    this.canvas.addEventListener("pointercancel", (event) => this.pointerUp(event));
    this.canvas.addEventListener("pointerleave", () => {
      this.cursor.hidden = true;
    });
    // Ctrl + wheel zooms the image instead of the whole page.
    this.scroller.addEventListener(
      "wheel",
      (event) => {
        if (!this.loaded || !event.ctrlKey) return;
        event.preventDefault();
        if (event.deltaY < 0) this.zoomIn();
        else this.zoomOut();
      },
      { passive: false },
    );
  }

  pointerDown(event) {
    if (!this.loaded || event.button !== 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.pushUndo();
    const point = this.imagePoint(event);
    this.stroke = { start: point, last: point };
    if (this.tool === "rectangle") {
      this.showRectangle(point, point);
    } else {
      this.paintSegment(point, point);
    }
  }

  pointerMove(event) {
    if (!this.loaded) return;
    this.moveCursor(event);
    if (!this.stroke) return;
    const point = this.imagePoint(event);
    if (this.tool === "rectangle") {
      this.showRectangle(this.stroke.start, point);
    } else {
      this.paintSegment(this.stroke.last, point);
    }
    this.stroke.last = point;
  }

  pointerUp(event) {
    if (!this.stroke) return;
    const point = this.imagePoint(event);
    if (this.tool === "rectangle") {
      this.fillRectangle(this.stroke.start, point);
      this.rectanglePreview.hidden = true;
    } else {
      this.paintSegment(this.stroke.last, point);
    }
    this.stroke = null;
    this.changed();
  }

  paintSegment(from, to) {
    const context = this.context;
    context.save();
    context.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
    context.strokeStyle = PAINT_COLOR;
    context.fillStyle = PAINT_COLOR;
    context.lineWidth = this.brushSize;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.beginPath();
    if (from.x === to.x && from.y === to.y) {
      context.arc(to.x, to.y, this.brushSize / 2, 0, Math.PI * 2);
      context.fill();
    } else {
      context.moveTo(from.x, from.y);
      context.lineTo(to.x, to.y);
      context.stroke();
    }
    context.restore();
  }

  fillRectangle(from, to) {
    const box = clampedBox(from, to, this.width, this.height);
    this.context.save();
    this.context.globalCompositeOperation = "source-over";
    this.context.fillStyle = PAINT_COLOR;
    this.context.fillRect(box.x, box.y, box.width, box.height);
    this.context.restore();
  }

  showRectangle(from, to) {
    const box = clampedBox(from, to, this.width, this.height);
    const style = this.rectanglePreview.style;
    style.left = `${box.x * this.zoom}px`;
    style.top = `${box.y * this.zoom}px`;
    style.width = `${box.width * this.zoom}px`;
    style.height = `${box.height * this.zoom}px`;
    this.rectanglePreview.hidden = false;
  }

  moveCursor(event) {
    if (this.tool === "rectangle") {
      this.cursor.hidden = true;
      return;
    }
    const box = this.stage.getBoundingClientRect();
    this.cursor.style.left = `${event.clientX - box.left}px`;
    this.cursor.style.top = `${event.clientY - box.top}px`;
    this.cursor.hidden = false;
  }

  updateCursorSize() {
    const diameter = Math.max(2, this.brushSize * this.zoom);
    this.cursor.style.width = `${diameter}px`;
    this.cursor.style.height = `${diameter}px`;
  }
}

/** Integer pixel box spanned by two points, clipped to the image. */
function clampedBox(from, to, width, height) {
  const left = Math.max(0, Math.floor(Math.min(from.x, to.x)));
  const top = Math.max(0, Math.floor(Math.min(from.y, to.y)));
  const right = Math.min(width, Math.ceil(Math.max(from.x, to.x)));
  const bottom = Math.min(height, Math.ceil(Math.max(from.y, to.y)));
  return { x: left, y: top, width: Math.max(0, right - left), height: Math.max(0, bottom - top) };
}
