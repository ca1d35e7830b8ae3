// The history strip's thumbnail maker (a module worker, started by thumbs.js): decodes a frame and scales it down
// off the page's main thread. In: {id, blob, width, height}; out: {id, bitmap} (an ImageBitmap, transferred), or
// {id, bitmap: null} when the image cannot be decoded.

self.addEventListener("message", async (e) => {
  const { id, blob, width, height } = e.data;
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(blob, { resizeWidth: width, resizeHeight: height, resizeQuality: "medium" });
  } catch {
    bitmap = null;
  }
  self.postMessage({ id, bitmap }, bitmap ? [bitmap] : []);
});
