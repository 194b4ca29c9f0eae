// A reply as it streams: markdown rendered block by block, code highlighted, Copy on each block.
//
// Rendering the whole reply again on every frame costs time in proportion to its length, so a
// long reply would make every frame slower than the last. Instead the text is cut at blank
// lines outside code fences: everything before the last such cut is rendered once, appended,
// and never touched again; only the block still being written is rendered on each frame. When
// the reply ends it is rendered whole, once, so what stays on the page is exactly the markdown
// of the whole text (reference links defined at its end, loose lists).
//
// Model output is untrusted: every piece of HTML goes through DOMPurify before the DOM.

import markdownit from "./vendor/markdown-it.mjs";
import DOMPurify from "./vendor/purify.mjs";
import hljs from "./vendor/highlight.mjs";

// Highlighting a block still being written on every frame costs its length each time: past
// this many characters it waits until the block is complete.
const HIGHLIGHT_WHILE_STREAMING = 4000;

function highlighted(code, language) {
  if (!language || !hljs.getLanguage(language)) return "";
  try {
    return hljs.highlight(code, { language, ignoreIllegals: true }).value;
  } catch {
    return "";
  }
}

const markdown = markdownit({ html: false, linkify: true, breaks: true, highlight: highlighted });
// The block still being written: highlighted only while it is short.
const plainMarkdown = markdownit({ html: false, linkify: true, breaks: true });

/** Sanitised HTML for `text`, as a fragment, with a Copy button on each code block. */
function fragmentOf(text, renderer = markdown) {
  const template = document.createElement("template");
  template.innerHTML = DOMPurify.sanitize(renderer.render(text));
  for (const pre of template.content.querySelectorAll("pre")) addCopyButton(pre);
  return template.content;
}

/** Copy `text` to the clipboard; briefly say so on `button`. */
export async function copyText(button, text) {
  try {
    await navigator.clipboard.writeText(text);
    button.dataset.copied = "true";
    setTimeout(() => delete button.dataset.copied, 1500);
  } catch (error) {
    console.warn("could not copy", error);
  }
}

function addCopyButton(pre) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy-code";
  button.setAttribute("aria-label", "Copy code");
  button.addEventListener("click", () => {
    const code = pre.querySelector("code");
    copyText(button, (code ?? pre).textContent);
  });
  pre.prepend(button);
}

/**
 * Where the text can be cut: just after the last blank line that is outside a code fence,
 * looking only at what came after `from` (which is itself such a cut, outside any fence).
 */
function lastCut(text, from) {
  let cut = from;
  let fence = null; // the marker of the fence we are in ("```" or "~~~"), if any
  let lineStart = from;
  while (lineStart < text.length) {
    const lineEnd = text.indexOf("\n", lineStart);
    if (lineEnd === -1) break; // the last line is not complete yet
    const line = text.slice(lineStart, lineEnd);
    const trimmed = line.trimStart();
    if (fence === null && (trimmed.startsWith("```") || trimmed.startsWith("~~~"))) {
      fence = trimmed.slice(0, 3);
    } else if (fence !== null && trimmed.startsWith(fence)) {
      fence = null;
    } else if (fence === null && line.trim() === "" && lineEnd + 1 > cut) {
      cut = lineEnd + 1;
    }
    lineStart = lineEnd + 1;
  }
  return cut;
}

export class ReplyView {
  /** `node`: the reply's bubble; its text goes into a child of its own. */
  constructor(node) {
    this.node = node;
    this.text = "";
    this.done = document.createElement("div"); // blocks rendered once, for good
    this.done.className = "content";
    this.tail = document.createElement("div"); // the block being written, rendered each frame
    this.tail.className = "content tail";
    this.rendered = 0; // characters of `text` in `done`
    this.queued = false;
    this.onRendered = () => {};
    node.append(this.done, this.tail);
  }

  /** More text: shown at the next animation frame. */
  add(text) {
    this.text += text;
    if (this.queued) return;
    this.queued = true;
    requestAnimationFrame(() => {
      if (this.queued) this.render(); // not if the reply ended meanwhile
    });
  }

  render() {
    this.queued = false;
    const cut = lastCut(this.text, this.rendered);
    if (cut > this.rendered) {
      this.done.append(fragmentOf(this.text.slice(this.rendered, cut)));
      this.rendered = cut;
    }
    const open = this.text.slice(this.rendered);
    const renderer = open.length > HIGHLIGHT_WHILE_STREAMING ? plainMarkdown : markdown;
    this.tail.replaceChildren(fragmentOf(open, renderer));
    this.onRendered();
  }

  /** The reply ended: rendered whole, once. */
  finish() {
    this.queued = false;
    this.done.replaceChildren(fragmentOf(this.text));
    this.tail.remove();
    this.rendered = this.text.length;
  }
}
