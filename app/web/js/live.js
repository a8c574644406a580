// The page's one WebSocket (docs/protocol.md): everything live comes over it, the answers of
// the open conversation and the changes to the conversation list. It reconnects by itself
// with backoff and jitter, and subscribes again with the cursors it has.

const GIVE_UP = new Set([4401, 4403]); // the credentials were refused: signing in again is the fix
const MAX_DELAY = 15_000;

export class LiveSocket {
  /**
   * handlers: frame(frame, request) for every server frame (`request`: the frame an ack or
   * error answers); status(text) for the connection state;
   * reconnected() after a reconnect (what happened meanwhile must be read over HTTP);
   * signedOut() when the server refused the session; cursor(conversationId) for resuming.
   */
  constructor(handlers) {
    this.handlers = handlers;
    this.ws = null;
    this.subscriptions = new Set(); // conversation ids to follow
    this.watchingList = false;
    this.attempts = 0;
    this.timer = 0;
    this.stopped = true;
    this.everOpened = false;
    this.refs = 0;
    this.reason = null; // why the server refused the socket, when it said so
    this.retryAfter = 0; // seconds the server asked to wait before reconnecting
    this.sent = new Map(); // ref -> the frame, until its ack or error
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.subscriptions.clear();
    this.watchingList = false;
    if (this.ws) this.ws.close(1000, "signed out");
    this.ws = null;
  }

  connect() {
    const ws = new WebSocket(`${location.origin.replace(/^http/, "ws")}/api/ws`);
    this.ws = ws;
    let accepted = false; // the server greeted the socket (or answered a frame): not opened, then refused
    ws.addEventListener("open", () => {
      if (this.ws !== ws) return;
      if (this.watchingList) this.sendFrame({ type: "subscribe_conversations" });
      for (const id of this.subscriptions) this.sendSubscribe(id, this.handlers.cursor(id));
    });
    ws.addEventListener("message", (event) => {
      if (this.ws !== ws || typeof event.data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      if (frame.type === "error" && !frame.ref && frame.details && frame.details.retryAfter) {
        // A close that means "come back later" follows (1012, 1013): not before it says.
        this.retryAfter = frame.details.retryAfter;
      }
      if (frame.type === "error" && frame.code === "too_many_sockets") {
        // The close (1013) follows; say why while retrying.
        this.reason = "Too many open tabs or apps use this key: close some. Retrying…";
      }
      if (!accepted && (frame.type === "hello" || frame.type === "ack")) {
        accepted = true;
        this.attempts = 0;
        this.handlers.status("");
        if (this.everOpened) this.handlers.reconnected();
        this.everOpened = true;
      }
      const request = frame.ref ? this.sent.get(frame.ref) : undefined;
      if (request) this.sent.delete(frame.ref);
      this.handlers.frame(frame, request);
    });
    ws.addEventListener("close", (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.sent.clear();
      if (this.stopped) return;
      if (GIVE_UP.has(event.code)) {
        this.stopped = true;
        this.handlers.signedOut();
        return;
      }
      this.retry();
    });
  }

  /** The next attempt after a growing, jittered pause (0.5 s, 1 s, 2 s … up to 15 s). */
  retry() {
    const backoff = Math.min(MAX_DELAY, 500 * 2 ** this.attempts) * (0.5 + Math.random() / 2);
    const delay = Math.max(backoff, (this.retryAfter || 0) * 1000);
    this.retryAfter = 0;
    this.attempts += 1;
    this.handlers.status(this.reason || "Connection lost, reconnecting…");
    this.reason = null;
    this.timer = setTimeout(() => {
      if (!this.stopped) this.connect();
    }, delay);
  }

  /** Try now (the browser came back online, or the person asked). */
  reconnectNow() {
    if (this.stopped || this.ws) return;
    clearTimeout(this.timer);
    this.connect();
  }

  get open() {
    return Boolean(this.ws && this.ws.readyState === WebSocket.OPEN);
  }

  sendFrame(frame) {
    if (!this.open) return false;
    this.refs += 1;
    const ref = `r${this.refs}`;
    this.sent.set(ref, frame);
    this.ws.send(JSON.stringify({ ...frame, ref }));
    return true;
  }

  sendSubscribe(conversationId, after) {
    const frame = { type: "subscribe", conversationId };
    if (after) frame.after = after;
    this.sendFrame(frame);
  }

  /** Follow a conversation (its answers, messages, edits, renames, deletion). */
  subscribe(conversationId, after) {
    this.subscriptions.add(conversationId);
    this.sendSubscribe(conversationId, after);
  }

  unsubscribe(conversationId) {
    if (this.subscriptions.delete(conversationId)) this.sendFrame({ type: "unsubscribe", conversationId });
  }

  /** Follow the conversation list: new, renamed, deleted and active conversations. */
  watchConversations() {
    this.watchingList = true;
    this.sendFrame({ type: "subscribe_conversations" });
  }
}
