// An answer as the list of parts the protocol builds (docs/protocol.md "Answer parts"):
// text as markdown, reasoning collapsed, tool calls with their arguments and results, data.
// The same view shows a live answer (fed event by event) and a stored message's parts.
import { MarkdownView } from "./markdown.js";

const pretty = (value) => JSON.stringify(value, null, 2);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const STATE_WORDS = { streaming: "running", complete: "done", incomplete: "cut short", invalid: "invalid arguments" };

export class AnswerView {
  /** `root`: the element the parts go in (the message's `.content`). */
  constructor(root) {
    this.root = root;
    this.parts = [];
  }

  /** The answer's text: its text parts, concatenated (what the stored message's content holds). */
  get text() {
    return this.parts
      .filter((p) => p.kind === "text")
      .map((p) => p.text)
      .join("");
  }

  /** Shows stored or snapshot parts, replacing whatever was shown. */
  setParts(parts) {
    this.root.replaceChildren();
    this.parts = [];
    for (const stored of parts) {
      const part = this.add(stored.kind, stored, false);
      if (!part) continue;
      part.text = stored.text || "";
      if (part.view) part.view.set(part.text);
      else if (part.body) part.body.textContent = part.text;
      if (stored.state !== "streaming") this.close(part, stored);
    }
  }

  /** `token`: more text, in the open text part or a new one. */
  token(text) {
    let part = this.parts[this.parts.length - 1];
    if (!part || part.kind !== "text" || part.state !== "streaming") part = this.add("text", {});
    part.text += text;
    part.view.append(text);
  }

  partStart(event) {
    this.closeText();
    this.add(event.kind, event);
  }

  partDelta(event) {
    const part = this.parts[event.part];
    if (!part || part.state !== "streaming") return;
    part.text += event.text;
    if (part.body) part.body.textContent = part.text;
  }

  partEnd(event) {
    const part = this.parts[event.part];
    if (part && part.state === "streaming") this.close(part, event);
  }

  /** The answer ended: `done` closes every part, `cancelled` and `error` leave the open ones cut short. */
  finish(complete) {
    for (const part of this.parts) {
      if (part.state === "streaming") this.close(part, { state: complete ? "complete" : "incomplete" });
    }
  }

  /** Tool calls of this answer that are complete: the ones a client may have to answer. */
  completeToolCalls() {
    return this.parts.filter((p) => p.kind === "tool_call" && p.state === "complete");
  }

  /** Results given inside the answer itself (tools the server ran). */
  answeredInside(toolCallId) {
    return this.parts.some((p) => p.kind === "tool_result" && p.toolCallId === toolCallId);
  }

  closeText() {
    const last = this.parts[this.parts.length - 1];
    if (last && last.kind === "text" && last.state === "streaming") this.close(last, { state: "complete" });
  }

  /** A new open part; `live`: seen from its start here, so its duration is known. */
  add(kind, info, live = true) {
    const part = {
      kind,
      state: "streaming",
      text: "",
      name: info.name || null,
      toolCallId: info.toolCallId || null,
      value: null,
      error: null,
      startedAt: live ? performance.now() : null,
    };
    const build = BUILDERS[kind];
    if (!build) return null; // a kind this page does not know: skipped, as the protocol asks
    part.node = build(part);
    part.node.classList.add("part", `part-${kind.replace("_", "-")}`);
    this.root.append(part.node);
    this.parts.push(part);
    if (kind === "text") part.view = new MarkdownView(part.node);
    return part;
  }

  close(part, end) {
    part.state = end.state || "complete";
    part.value = end.value === undefined ? null : end.value;
    part.error = end.error || null;
    if (part.view) part.view.flush();
    if (part.finish) part.finish(part);
  }
}

const BUILDERS = {
  text: () => element("div"),

  reasoning(part) {
    const details = element("details");
    const summary = element("summary", null, "Thinking…");
    part.body = element("div", "part-body");
    details.append(summary, part.body);
    part.finish = (p) => {
      // Seen live, the page knows how long it took; a stored answer does not say.
      const seconds = Math.max(1, Math.round((performance.now() - p.startedAt) / 1000));
      if (p.state === "incomplete") summary.textContent = "Thinking (stopped)";
      else summary.textContent = p.startedAt === null ? "Thoughts" : `Thought for ${seconds} s`;
    };
    return details;
  },

  tool_call(part) {
    const box = element("div");
    const title = element("p", "part-title");
    title.append("Tool call ", element("code", null, part.name || "?"), " ");
    const state = element("span", "part-state", "running");
    title.append(state);
    part.body = element("pre", "part-body");
    box.append(title, part.body);
    part.finish = (p) => {
      state.textContent = STATE_WORDS[p.state] || p.state;
      if (p.state === "complete") p.body.textContent = pretty(p.value);
      if (p.error) box.append(element("p", "part-error", p.error));
      box.dataset.toolCallId = p.toolCallId || "";
    };
    return box;
  },

  tool_result(part) {
    const box = element("div");
    const title = element("p", "part-title");
    title.append("Result of ", element("code", null, part.name || "the tool"));
    part.body = element("pre", "part-body");
    box.append(title, part.body);
    part.finish = (p) => {
      p.body.textContent = p.error !== null ? `Failed: ${p.error}` : pretty(p.value);
      if (p.error !== null) box.classList.add("failed");
    };
    return box;
  },

  data(part) {
    const details = element("details");
    details.append(element("summary", null, `Data: ${part.name || "unnamed"}`));
    part.body = element("pre", "part-body");
    details.append(part.body);
    part.finish = (p) => {
      p.body.textContent = pretty(p.value);
    };
    return details;
  },
};
