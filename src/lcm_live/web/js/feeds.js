// The video sources that feed the sketch canvas: the camera and the screen (screen capture, getDisplayMedia),
// both CameraFeeds (camera.js), one at a time: starting one stops the other. The page grabs the running one's next
// frame as each picture arrives.

import { CameraFeed, openScreen, screenAvailable, setupCamera } from "./camera.js";

/**
 * Wire the Camera and Screen buttons. busy(): a frame is on its way (the watchdogs wait);
 * beforeStart(): before either starts (may return a promise: the page switches to sketch mode);
 * onError(text, source), onDone(source): source is "camera" or "screen".
 */
export function setupFeeds(sketch, { cameraButton, screenButton, busy, beforeStart, onError, onDone }) {
  const camera = new CameraFeed(sketch);
  const screen = new CameraFeed(sketch, openScreen);
  const all = [camera, screen];
  for (const [feed, button, what, other] of [[camera, cameraButton, "camera", screen],
                                             [screen, screenButton, "screen", camera]]) {
    feed.busy = busy;
    const options = {
      what,
      beforeStart: () => {
        other.stop();
        return beforeStart();
      },
      onError: (text) => onError(text, what),
      onDone: () => onDone(what),
    };
    if (feed === screen) options.available = screenAvailable();
    setupCamera(button, feed, options);
  }
  return {
    camera,
    screen,
    /** The running source's next frame onto the canvas (none running: nothing). */
    grab: () => all.some((f) => f.on && f.grab()),
    stop: () => all.forEach((f) => f.stop()),
  };
}
