// The open conversation: its messages, sending, the answers streaming in, and the socket.
import { AnswerView } from "./answer.js";
import { ApiError, api, enc, newId } from "./api.js";
import { LiveSocket } from "./live.js";
import {
  addConversation,
  bumpConversation,
  conversationGone,
  forgetConversation,
  loadConversations,
  renderConversations,
  resetConversationActions,
  updateConversation,
} from "./conversations.js";
import { addMessageActions, messageNode, refreshAnswerAgain, refreshToolForms } from "./messages.js";
import {
  PARTIAL_KEPT,
  agentName,
  clearError,
  conversationLabel,
  el,
  note,
  session,
  showConversations,
  showError,
  state,
} from "./page.js";

const TERMINAL = new Set(["done", "cancelled", "error"]);

// -- following the open conversation ----------------------------------------------------

/**
 * Shows the newest message: always when `force` (the person opened a conversation or sent
 * something), else only while they are at the end; one who scrolled up to read is left there
 * and offered "Jump to latest".
 */
export function scrollToEnd(force = false) {
  if (!force && !state.following) {
    el.jumpLatest.hidden = false;
    return;
  }
  el.chatBody.scrollTop = el.chatBody.scrollHeight;
  state.scrolledTo = el.chatBody.scrollTop;
  state.following = true;
  el.jumpLatest.hidden = true;
}

el.chatBody.addEventListener("scroll", () => {
  // Scroll events arrive a frame late: by then the answer may have grown, so "not at the end"
  // alone does not mean the person scrolled; above where this page last scrolled to does.
  const body = el.chatBody;
  if (body.scrollHeight - body.scrollTop - body.clientHeight < 40) {
    state.following = true;
    el.jumpLatest.hidden = true;
  } else if (body.scrollTop < state.scrolledTo - 2) {
    state.following = false;
  }
});

el.jumpLatest.addEventListener("click", () => scrollToEnd(true));

/** Says who answers in this conversation, or that nobody will (it has no agent). */
export function showWhoAnswers(conversation) {
  el.chatAgent.textContent = conversation.agentId
    ? `Answers come from ${agentName(conversation.agentId)}.`
    : "This conversation has no agent: nobody will answer here. Start a new conversation with an agent to get answers.";
  el.chatAgent.hidden = false;
}

export async function selectConversation(conversation) {
  if (state.current && state.current.id === conversation.id) {
    showConversations(false); // back to it, on a phone
    el.input.focus();
    return;
  }
  leaveConversation();
  state.current = conversation;
  state.olderCursor = null;
  sessionStorage.setItem("chatstream.current", conversation.id);
  renderConversations();
  el.chatTitle.textContent = conversationLabel(conversation);
  resetConversationActions();
  el.chatEmpty.hidden = true;
  el.chatBody.hidden = false;
  el.composer.hidden = false;
  showWhoAnswers(conversation);
  showConversations(false);
  el.input.focus(); // opening a conversation is to write in it
  el.messageList.replaceChildren();
  // Following it first, then reading its messages: a running answer comes over the socket
  // from its start, and nothing said meanwhile falls between the two. From its start: what
  // this page saw of it before (opened earlier, then left) is shown again, whole.
  state.seqs.clear();
  state.cursors.delete(conversation.id);
  live.subscribe(conversation.id);
  await loadMessages(conversation);
}

/** Reads the newest page of messages and merges it with what arrived live meanwhile. */
export async function loadMessages(conversation) {
  let page;
  try {
    page = await api("GET", `/api/conversations/${conversation.id}/messages`);
  } catch (err) {
    if (conversationGone(err, conversation.id)) {
      showError(err);
      return;
    }
    showError(err, () => {
      if (state.current === conversation) loadMessages(conversation);
    });
    return;
  }
  if (state.current !== conversation) return;
  const streaming = state.live ? state.live.generationId : null;
  const shown = new Set(page.items.map((m) => m.id));
  const nodes = page.items
    .filter((m) => !(m.generationId && m.generationId === streaming)) // the live bubble shows it
    .map(messageNode);
  const arrived = [...el.messageList.children].filter((li) => !li.dataset.id || !shown.has(li.dataset.id));
  el.messageList.replaceChildren(...nodes, ...arrived);
  state.olderCursor = page.nextCursor;
  el.messagesOlder.hidden = !page.nextCursor;
  afterMessagesChanged();
  scrollToEnd(true);
}

export function leaveConversation() {
  if (state.current) live.unsubscribe(state.current.id);
  endLive();
}

/** Whatever changed in the list: the offers that depend on the newest message follow. */
export function afterMessagesChanged() {
  refreshToolForms();
  refreshAnswerAgain();
}

el.messagesOlder.addEventListener("click", async () => {
  const conversation = state.current;
  if (!conversation || !state.olderCursor) return;
  let page;
  try {
    page = await api("GET", `/api/conversations/${conversation.id}/messages?before=${enc(state.olderCursor)}`);
  } catch (err) {
    showError(err, () => el.messagesOlder.click());
    return;
  }
  if (state.current !== conversation) return;
  const before = el.chatBody.scrollHeight;
  el.messageList.prepend(...page.items.map(messageNode));
  el.chatBody.scrollTop += el.chatBody.scrollHeight - before;
  state.olderCursor = page.nextCursor;
  el.messagesOlder.hidden = !page.nextCursor;
});

/** A message of the open conversation, from the socket or an answer to a request: shown once. */
export function showMessage(m) {
  if (!state.current || m.conversationId !== state.current.id) return;
  const existing = el.messageList.querySelector(`.message[data-id="${m.id}"]`);
  if (existing) return;
  if (m.role === "agent" && m.generationId) {
    // The answer streamed here: its bubble becomes the stored message at its end.
    const bubble = el.messageList.querySelector(`.message.live[data-generation-id="${m.generationId}"]`);
    if (bubble) {
      bubble.message = m;
      return;
    }
  }
  const live = el.messageList.querySelector(".message.live");
  el.messageList.insertBefore(messageNode(m), m.role === "agent" ? null : live);
  afterMessagesChanged();
  scrollToEnd();
}

export function replaceMessage(m) {
  const existing = el.messageList.querySelector(`.message[data-id="${m.id}"]`);
  if (!existing || existing.querySelector(".message-edit")) return; // someone is editing it here
  const shown = existing.message;
  if (shown && shown.editedAt === m.editedAt && shown.effectiveContent === m.effectiveContent) return; // this tab's own edit
  // The focus stays on the same button of the new node (a keyboard user loses no place).
  const focused = existing.contains(document.activeElement) ? document.activeElement.className : null;
  const replacement = messageNode(m);
  existing.replaceWith(replacement);
  if (focused) {
    const again = replacement.querySelector(`[class="${focused}"]`);
    if (again) again.focus();
  }
  afterMessagesChanged();
}

// -- sending ----------------------------------------------------------------------------

export async function send() {
  const conversation = state.current;
  if (!conversation) return;
  const content = el.input.value;
  if (!content.trim()) return;
  // A retry of the same text keeps its clientMessageId, so the server stores it once.
  if (!state.pending || state.pending.conversationId !== conversation.id || state.pending.content !== content) {
    state.pending = { conversationId: conversation.id, content, clientMessageId: newId() };
  }
  const pending = state.pending;
  el.send.disabled = true;
  let posted;
  try {
    posted = await api("POST", `/api/conversations/${conversation.id}/messages`, {
      content,
      clientMessageId: pending.clientMessageId,
    });
  } catch (err) {
    if (conversationGone(err, conversation.id)) showError(err);
    else showError(err, send);
    return;
  } finally {
    el.send.disabled = false;
  }
  state.pending = null;
  clearError();
  if (el.input.value === content) el.input.value = "";
  if (state.current !== conversation) return;
  showMessage(posted.message);
  bumpConversation(conversation.id, posted.message.createdAt);
  scrollToEnd(true);
  // The answer it started arrives over the socket (the `start` event opens its bubble).
}

el.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

el.input.addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter (and Enter while an input method composes) is a new line.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey) {
    event.preventDefault();
    send();
  }
});

// -- answers, live ----------------------------------------------------------------------

export function setStreaming(on, text) {
  el.stop.hidden = !on;
  el.stop.disabled = false;
  el.streamStatus.textContent = text || "";
}

/** A bubble for an answer that started in the open conversation (sent here or anywhere). */
export function beginLive(generationId) {
  endLive();
  const bubble = document.createElement("li");
  bubble.className = "message agent streaming live";
  bubble.dataset.generationId = generationId;
  bubble.setAttribute("aria-live", "polite");
  bubble.setAttribute("aria-busy", "true");
  const author = document.createElement("p");
  author.className = "author";
  author.textContent = agentName(state.current && state.current.agentId);
  const content = document.createElement("div");
  content.className = "content";
  bubble.append(author, content);
  bubble.answer = new AnswerView(content);
  el.messageList.append(bubble);
  state.live = { generationId, bubble, view: bubble.answer };
  setStreaming(true, "Answering…");
  refreshAnswerAgain();
  scrollToEnd();
  return state.live;
}

/** Stops showing an answer as live (it ended, or the page left its conversation). */
export function endLive() {
  const s = state.live;
  if (!s) return;
  state.live = null;
  s.bubble.classList.remove("streaming", "live");
  s.bubble.removeAttribute("aria-busy");
  setStreaming(false);
}

/** The answer ended: the bubble becomes the stored message (with its buttons), or says why not. */
export function finishLive(s, event) {
  s.view.finish(event.type === "done");
  const messageId = event.messageId || (s.bubble.message && s.bubble.message.id);
  let cls = null;
  let text = null;
  if (event.type === "cancelled") {
    cls = "stopped";
    text = messageId ? PARTIAL_KEPT : "Stopped. The answer was discarded.";
  } else if (event.type === "error") {
    cls = "failed";
    text = `The answer failed: ${event.message || "unknown error"}`;
  }
  endLive();
  if (cls) s.bubble.classList.add(cls);
  if (messageId) {
    const stored = el.messageList.querySelector(`.message[data-id="${messageId}"]`);
    if (stored && stored !== s.bubble) stored.remove();
    s.bubble.dataset.id = messageId;
    s.bubble.querySelector(".content").id = `message-${messageId}-content`;
    const m = s.bubble.message || {
      id: messageId,
      conversationId: state.current && state.current.id,
      role: "agent",
      effectiveContent: s.view.text,
      generationId: s.generationId,
    };
    s.bubble.message = m;
    addMessageActions(s.bubble, m);
  }
  // Above the answer's buttons, where a reload shows it too.
  if (text) s.bubble.insertBefore(note(text), s.bubble.querySelector(".message-actions"));
  afterMessagesChanged();
  scrollToEnd(); // the note under the answer too
}

/** One event of an answer (docs/protocol.md "Generation events"), applied once, in order. */
export function applyAnswerEvent(e) {
  if (!state.current || e.conversationId !== state.current.id) return;
  if (e.seq <= (state.seqs.get(e.generationId) || 0)) return;
  state.seqs.set(e.generationId, e.seq);
  state.cursors.set(e.conversationId, `${e.generationId}.${e.seq}`);
  let s = state.live;
  if (!s || s.generationId !== e.generationId) {
    // Already shown whole (a stored message), or only its end seen: nothing to stream.
    if (el.messageList.querySelector(`.message[data-generation-id="${e.generationId}"]`)) return;
    if (TERMINAL.has(e.type)) return;
    s = beginLive(e.generationId);
  }
  const view = s.view;
  switch (e.type) {
    case "token":
      view.token(e.text);
      break;
    case "part.start":
      view.partStart(e);
      break;
    case "part.delta":
      view.partDelta(e);
      break;
    case "part.end":
      view.partEnd(e);
      break;
    case "snapshot":
      view.setParts(e.parts);
      break;
    case "done":
    case "cancelled":
    case "error":
      finishLive(s, e);
      return;
    default:
      break;
  }
  scrollToEnd();
}

document.addEventListener("keydown", (event) => {
  // Escape stops a running answer, unless it is closing something else first (a rename, an
  // edit or the delete question handle their own Escape).
  if (event.key !== "Escape" || event.defaultPrevented || el.stop.hidden || el.stop.disabled) return;
  const owner = event.target instanceof Element ? event.target.closest("form, [role=group]") : null;
  if (owner && owner !== el.composer) return;
  event.preventDefault();
  el.stop.click();
});

el.stop.addEventListener("click", async () => {
  const s = state.live;
  if (!s) return;
  el.stop.disabled = true;
  el.streamStatus.textContent = "Stopping…";
  try {
    await api("POST", `/api/generations/${s.generationId}/cancel`);
  } catch (err) {
    el.stop.disabled = false;
    showError(err, () => el.stop.click());
  }
  // The `cancelled` event finishes the bubble.
});

// -- the socket -------------------------------------------------------------------------

export function onFrame(frame, request) {
  switch (frame.type) {
    case "hello":
    case "ack":
    case "pong":
    case "generation.started": // its `start` event follows
      return;
    case "error":
      if (frame.generationId) applyAnswerEvent(frame);
      else onFrameRefused(frame, request);
      return;
    case "message.created":
      bumpConversation(frame.conversationId, frame.message.createdAt);
      showMessage(frame.message);
      return;
    case "message.edited":
      replaceMessage(frame.message);
      return;
    case "conversation.created":
      addConversation(frame.conversation);
      return;
    case "conversation.updated":
      updateConversation(frame.conversation);
      return;
    case "conversation.activity":
      bumpConversation(frame.conversationId, frame.lastMessageAt);
      return;
    case "conversation.deleted":
      goneElsewhere(frame.conversationId);
      return;
    default:
      if (frame.generationId) applyAnswerEvent(frame);
  }
}

/** The server refused one of our frames. */
export function onFrameRefused(frame, request) {
  if (!request || request.type !== "subscribe") return; // e.g. a server without the list feed
  if (frame.code === "not_found") goneElsewhere(request.conversationId);
  else if (frame.code === "invalid_cursor") live.subscribe(request.conversationId); // start over, without it
}

/** A conversation deleted in another tab, on a phone or over the API. */
export function goneElsewhere(id) {
  const wasOpen = state.current && state.current.id === id;
  forgetConversation(id);
  if (wasOpen) {
    const err = new ApiError(404, { error: "gone" });
    err.conversationGone = true;
    showError(err);
  }
}

export const live = new LiveSocket({
  frame: onFrame,
  status(text) {
    el.connectionStatus.textContent = text;
    el.connectionStatus.hidden = !text;
  },
  cursor: (conversationId) => state.cursors.get(conversationId),
  reconnected() {
    // Conversation events are not replayed: read what changed while the socket was down.
    loadConversations(true);
    if (state.current) loadMessages(state.current);
  },
  signedOut() {
    if (!state.me) return;
    state.me = null;
    session.ended();
    showError(new ApiError(401, { error: "Your session ended (signed out elsewhere, or the key was revoked). Sign in again." }));
  },
});

window.addEventListener("online", () => live.reconnectNow());
