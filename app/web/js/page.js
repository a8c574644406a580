// What every part of the page shares: its elements, its state, the alert region, small helpers.
import { ApiError, NetworkError, describe } from "./api.js";

const $ = (id) => document.getElementById(id);
export const el = {
  loading: $("loading"),
  switchAccount: $("switch-account"),
  switchCurrent: $("switch-current"),
  switchYes: $("switch-yes"),
  switchNo: $("switch-no"),
  login: $("login"),
  loginForm: $("login-form"),
  loginKey: $("login-key"),
  app: $("app"),
  whoami: $("whoami"),
  logout: $("logout"),
  toggleConversations: $("toggle-conversations"),
  alert: $("alert"),
  alertText: $("alert-text"),
  alertRetry: $("alert-retry"),
  alertDismiss: $("alert-dismiss"),
  agentSelect: $("agent-select"),
  newConversation: $("new-conversation"),
  conversationList: $("conversation-list"),
  conversationsMore: $("conversations-more"),
  chatTitle: $("chat-title"),
  conversationActions: $("conversation-actions"),
  rename: $("rename"),
  renameForm: $("rename-form"),
  renameInput: $("rename-input"),
  renameCancel: $("rename-cancel"),
  del: $("delete"),
  deleteConfirm: $("delete-confirm"),
  deleteYes: $("delete-yes"),
  deleteNo: $("delete-no"),
  chatEmpty: $("chat-empty"),
  chatAgent: $("chat-agent"),
  conversationFilter: $("conversation-filter"),
  jumpLatest: $("jump-latest"),
  conversationFilterEmpty: $("conversation-filter-empty"),
  chatBody: $("chat-body"),
  messagesOlder: $("messages-older"),
  messageList: $("message-list"),
  composer: $("composer"),
  input: $("composer-input"),
  send: $("send"),
  stop: $("stop"),
  streamStatus: $("stream-status"),
  connectionStatus: $("connection-status"),
};

// The note under a stopped answer whose text was kept: the same live and after a reload.
export const PARTIAL_KEPT = "Stopped. The partial answer was kept.";

export const state = {
  agentsLoaded: Promise.resolve(),
  following: true, // the messages scroll with a growing answer (false once the person scrolls up)
  scrolledTo: 0, // the chat's scrollTop where scrollToEnd last put it
  me: null,
  agents: [],
  conversations: [],
  conversationsCursor: null,
  current: null, // the selected conversation
  olderCursor: null,
  pending: null, // {conversationId, content, clientMessageId} of a send not yet confirmed
  live: null, // the answer streaming in the open conversation: {generationId, bubble, view}
  seqs: new Map(), // generationId -> the last seq applied (events are applied once)
  cursors: new Map(), // conversationId -> cursor of the last event applied, to resume with
};

// -- the alert region -------------------------------------------------------------------

let retryAction = null;

/** What the page does when the server says the session ended (set by app.js: show the sign-in). */
export const session = { ended: () => {} };

export function showError(err, retry) {
  if (err instanceof ApiError && err.status === 401 && state.me) {
    // The session ended (signed out elsewhere, key revoked).
    state.me = null;
    session.ended();
  }
  el.alertText.textContent = describe(err);
  retryAction = retry || null;
  el.alertRetry.hidden = !(retry && (err instanceof NetworkError || (err instanceof ApiError && err.status === 429)));
  el.alert.hidden = false;
}

export function clearError() {
  el.alert.hidden = true;
  el.alertText.textContent = "";
  retryAction = null;
}

el.alertDismiss.addEventListener("click", clearError);
el.alertRetry.addEventListener("click", () => {
  const action = retryAction;
  clearError();
  if (action) action();
});

export function agentName(agentId) {
  const agent = state.agents.find((a) => a.id === agentId);
  return agent ? agent.name : "Agent";
}

export function conversationLabel(c) {
  return c.title || "Untitled conversation";
}

export function formatTime(iso) {
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function note(text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  return p;
}

/** Phones show one panel at a time: the conversation list, or the chat (CSS, under 700px). */
export function showConversations(on) {
  el.app.classList.toggle("show-conversations", on);
  el.toggleConversations.setAttribute("aria-expanded", String(on));
  el.toggleConversations.textContent = on ? "Back to the chat" : "Conversations";
  el.toggleConversations.disabled = on && !state.current; // nothing to go back to
}

el.toggleConversations.addEventListener("click", () => {
  const on = !el.app.classList.contains("show-conversations");
  showConversations(on);
  if (on) el.agentSelect.focus();
});
