// Markdown for messages: marked parses, DOMPurify sanitizes, highlight.js colours code
// (all vendored in ../vendor, see its README). While an answer streams, the blocks that are
// finished are rendered once and never touched again; only the last, still open block is
// rendered again, at most once per animation frame.
import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.js";
import hljs from "../vendor/highlight.min.js";

const escapeHtml = (text) =>
  text.replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);

const markdown = new Marked({ gfm: true, breaks: false });
markdown.use({
  renderer: {
    // HTML written in a message is shown as text, never as markup (DOMPurify is the second wall).
    html({ text, block }) {
      return block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    // No remote images: they would tell a third party who reads the conversation (and the
    // CSP forbids them). A link to the image instead.
    image({ href, text }) {
      return `<a href="${escapeHtml(href || "")}">${escapeHtml(text ? `Image: ${text}` : "Image")}</a>`;
    },
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0].toLowerCase();
      const known = language && hljs.getLanguage(language);
      const body = known ? hljs.highlight(text, { language, ignoreIllegals: true }).value : escapeHtml(text);
      const label = language ? ` data-language="${escapeHtml(language)}"` : "";
      return `<pre${label}><code class="hljs${known ? ` language-${escapeHtml(language)}` : ""}">${body}</code></pre>`;
    },
  },
});

// Links leave the app in a new tab that cannot reach back (window.opener) or see where it came from.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});
const PURIFY = { RETURN_DOM_FRAGMENT: true, FORBID_TAGS: ["style", "form"], FORBID_ATTR: ["style"] };

/** Render figures a test or a curious person can read in the console: `chatstreamRender`. */
export const renderStats = { blocks: 0, openRenders: 0, ms: 0 };
window.chatstreamRender = renderStats;

/** Sanitized DOM for some block tokens, with a Copy button on each code block. */
function blocksToDom(tokens, links) {
  const list = Object.assign(tokens, { links });
  const fragment = DOMPurify.sanitize(markdown.parser(list), PURIFY);
  // The newlines marked puts between blocks are not text of the message.
  for (const node of [...fragment.childNodes]) {
    if (node.nodeType === Node.TEXT_NODE && !node.textContent.trim()) node.remove();
  }
  for (const pre of fragment.querySelectorAll("pre")) decorateCode(pre);
  return fragment;
}

function decorateCode(pre) {
  const box = document.createElement("div");
  box.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.textContent = pre.dataset.language || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "secondary code-copy";
  copy.textContent = "Copy code";
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(pre.textContent);
      copy.textContent = "Copied";
    } catch (err) {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => {
      copy.textContent = "Copy code";
    }, 2000);
  });
  bar.append(label, copy);
  pre.replaceWith(box);
  box.append(bar, pre);
}

/** Renders a whole markdown text into `root` (a stored message). */
export function renderMarkdown(root, text) {
  const view = new MarkdownView(root);
  view.set(text);
  return view;
}
window.chatstreamRenderOnce = renderMarkdown; // what one whole render costs, for comparison

/** A growing markdown text shown in `root`: finished blocks once, the open block again as it grows. */
export class MarkdownView {
  constructor(root) {
    this.root = root;
    this.source = "";
    this.settled = 0; // characters of `source` whose blocks are rendered for good
    this.open = null; // the element holding the open (last) block
    this.frame = 0;
  }

  /** Replaces the whole text (a snapshot, a stored message). */
  set(text) {
    this.cancelFrame();
    this.source = text;
    this.settled = 0;
    this.open = null;
    this.root.replaceChildren();
    this.render();
  }

  /** Adds a piece; the page shows it by the next frame. */
  append(piece) {
    this.source += piece;
    if (!this.frame) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    }
  }

  /** Shows everything now (the answer ended, or a test wants to read it). */
  flush() {
    if (this.frame) {
      this.cancelFrame();
      this.render();
    }
  }

  cancelFrame() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
  }

  render() {
    const started = performance.now();
    const rest = this.source.slice(this.settled);
    const tokens = markdown.lexer(rest);
    let last = tokens.length - 1;
    while (last > 0 && tokens[last].type === "space") last--;
    // Every block before the last one is finished: a later token started after it.
    let offset = 0;
    let first = 0;
    for (; first < last; first++) {
      const raw = tokens[first].raw;
      if (rest.substr(offset, raw.length) !== raw) break; // the lexer rewrote the text: keep it open
      offset += raw.length;
      if (tokens[first].type === "space") continue;
      this.root.insertBefore(blocksToDom([tokens[first]], tokens.links), this.open);
      renderStats.blocks += 1;
    }
    this.settled += offset;
    if (!this.open) {
      this.open = document.createElement("div");
      this.open.className = "md-open";
      this.root.append(this.open);
    }
    this.open.replaceChildren(blocksToDom(tokens.slice(first), tokens.links));
    renderStats.openRenders += 1;
    renderStats.ms += performance.now() - started;
  }
}
