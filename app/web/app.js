// chatstream web client: plain JavaScript modules, no build step. It talks to the REST API
// (session cookie) and follows everything live over one WebSocket per tab (./js/live.js).
import { api, ApiError, describe, enc, NetworkError, newId } from "./js/api.js";
import { AnswerView } from "./js/answer.js";
import { renderMarkdown } from "./js/markdown.js";
import { LiveSocket } from "./js/live.js";

const $ = (id) => document.getElementById(id);
const el = {
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
const PARTIAL_KEPT = "Stopped. The partial answer was kept.";
const TERMINAL = new Set(["done", "cancelled", "error"]);

const state = {
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

function showError(err, retry) {
  if (err instanceof ApiError && err.status === 401 && state.me) {
    // The session ended (signed out elsewhere, key revoked).
    state.me = null;
    showLogin();
  }
  el.alertText.textContent = describe(err);
  retryAction = retry || null;
  el.alertRetry.hidden = !(retry && (err instanceof NetworkError || (err instanceof ApiError && err.status === 429)));
  el.alert.hidden = false;
}

function clearError() {
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

// -- signing in and out ---------------------------------------------------------------

function showLogin() {
  live.stop();
  endLive();
  el.loading.hidden = true;
  el.app.hidden = true;
  el.logout.hidden = true;
  el.whoami.hidden = true;
  el.toggleConversations.hidden = true;
  el.login.hidden = false;
  el.loginKey.focus();
}

async function showApp(me) {
  state.me = me;
  el.loading.hidden = true;
  el.login.hidden = true;
  el.app.hidden = false;
  el.logout.hidden = false;
  el.whoami.hidden = false;
  el.whoami.textContent = `${me.key.name} · ${me.company.name} (${me.role})`;
  el.toggleConversations.hidden = false;
  showConversations(true); // a phone starts on the list (the chat once a conversation is open)
  live.start();
  live.watchConversations(); // first, so that no conversation made meanwhile is missed
  state.agentsLoaded = loadAgents();
  await Promise.all([state.agentsLoaded, loadConversations(true)]);
  // After a reload: back to the conversation this tab had open.
  const saved = sessionStorage.getItem("chatstream.current");
  const conversation = saved && state.conversations.find((c) => c.id === saved);
  if (conversation && !state.current) await selectConversation(conversation);
}

/** Phones show one panel at a time: the conversation list, or the chat (CSS, under 700px). */
function showConversations(on) {
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

async function signIn(key) {
  const me = await api("POST", "/api/session", { key });
  clearError();
  await showApp(me);
}

// The key of a login link (`/#key=…`), taken out of the address bar and the history.
function takeLinkKey() {
  const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return decodeURIComponent(match[1]);
}

async function signInWithLink(key) {
  try {
    await signIn(key);
  } catch (err) {
    showLogin();
    showError(err, () => signIn(key).catch((e) => showError(e)));
  }
}

// A link to someone else's key must not silently replace this session (login CSRF):
// with a session, ask first; staying is the default.
function askToSwitch(me, key) {
  el.loading.hidden = true;
  el.switchCurrent.textContent = `${me.key.name} · ${me.company.name}`;
  el.switchAccount.hidden = false;
  el.switchNo.focus();
  const answer = (switching) => {
    el.switchAccount.hidden = true;
    el.switchYes.onclick = el.switchNo.onclick = null;
    if (switching) signInWithLink(key);
    else showApp(me).catch((err) => showError(err, boot));
  };
  el.switchYes.onclick = () => answer(true);
  el.switchNo.onclick = () => answer(false);
}

async function boot() {
  const key = takeLinkKey();
  let me;
  try {
    me = await api("GET", "/api/me");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      if (key) await signInWithLink(key);
      else showLogin();
    } else {
      el.loading.hidden = true;
      showError(err, boot);
    }
    return;
  }
  if (key) askToSwitch(me, key);
  else await showApp(me);
}

el.loginForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = el.loginKey.value.trim();
  if (!key) return;
  try {
    await signIn(key);
    el.loginKey.value = "";
  } catch (err) {
    showError(err, () => el.loginForm.requestSubmit());
  }
});

el.logout.addEventListener("click", async () => {
  try {
    await api("DELETE", "/api/session");
  } catch (err) {
    showError(err, () => el.logout.click());
    return;
  }
  state.me = null;
  live.stop();
  endLive();
  state.current = null;
  state.conversations = [];
  sessionStorage.clear();
  el.conversationList.replaceChildren();
  el.messageList.replaceChildren();
  resetConversationActions();
  el.chatTitle.textContent = "No conversation selected";
  el.chatEmpty.hidden = false;
  el.chatBody.hidden = true;
  el.composer.hidden = true;
  clearError();
  showLogin();
});

// -- agents and conversations ---------------------------------------------------------

async function loadAgents() {
  try {
    state.agents = await api("GET", "/api/agents");
  } catch (err) {
    showError(err, loadAgents);
    return;
  }
  el.agentSelect.replaceChildren(
    ...state.agents.map((agent) => new Option(agent.name, agent.id)),
    new Option("No agent", ""),
  );
}

function agentName(agentId) {
  const agent = state.agents.find((a) => a.id === agentId);
  return agent ? agent.name : "Agent";
}

function conversationLabel(c) {
  return c.title || "Untitled conversation";
}

function formatTime(iso) {
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function renderConversations() {
  // The filter matches the titles shown (of the conversations loaded so far), in any case.
  const wanted = el.conversationFilter.value.trim().toLowerCase();
  const shown = wanted
    ? state.conversations.filter((c) => conversationLabel(c).toLowerCase().includes(wanted))
    : state.conversations;
  el.conversationFilterEmpty.textContent =
    wanted && !shown.length ? "No loaded conversation has a title like that." : "";
  el.conversationList.replaceChildren(
    ...shown.map((c) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.id = c.id;
      if (state.current && state.current.id === c.id) button.setAttribute("aria-current", "true");
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = conversationLabel(c);
      const when = document.createElement("span");
      when.className = "when";
      when.textContent = formatTime(c.lastMessageAt);
      button.append(title, when);
      button.addEventListener("click", () => selectConversation(c));
      li.append(button);
      return li;
    }),
  );
  el.conversationsMore.hidden = !state.conversationsCursor;
}

async function loadConversations(reset) {
  const cursor = reset ? null : state.conversationsCursor;
  let page;
  try {
    page = await api("GET", "/api/conversations" + (cursor ? `?cursor=${enc(cursor)}` : ""));
  } catch (err) {
    showError(err, () => loadConversations(reset));
    return;
  }
  const known = new Set(reset ? [] : state.conversations.map((c) => c.id));
  state.conversations = (reset ? [] : state.conversations).concat(page.items.filter((c) => !known.has(c.id)));
  state.conversationsCursor = page.nextCursor;
  renderConversations();
}

el.conversationsMore.addEventListener("click", () => loadConversations(false));
el.conversationFilter.addEventListener("input", renderConversations);

async function createConversation() {
  await state.agentsLoaded; // a quick click while the agents load would make one without agent
  const body = {};
  if (el.agentSelect.value) body.agentId = el.agentSelect.value;
  let conversation;
  try {
    conversation = await api("POST", "/api/conversations", body);
  } catch (err) {
    showError(err, createConversation);
    return;
  }
  clearError();
  addConversation(conversation);
  await selectConversation(conversation); // which puts the focus in the composer
}

el.newConversation.addEventListener("submit", (event) => {
  event.preventDefault();
  createConversation();
});

/** Moves a conversation to the top of the list: it has the newest activity. */
function bumpConversation(id, when) {
  const index = state.conversations.findIndex((c) => c.id === id);
  if (index < 0) return;
  const [conversation] = state.conversations.splice(index, 1);
  state.conversations.unshift(conversation);
  if (when && (!conversation.lastMessageAt || when > conversation.lastMessageAt)) conversation.lastMessageAt = when;
  renderConversations();
}

/** A conversation made here or elsewhere: on top of the list, once. */
function addConversation(conversation) {
  if (state.conversations.some((c) => c.id === conversation.id)) return;
  state.conversations.unshift(conversation);
  renderConversations();
}

/** A 404 about the conversation itself: it was deleted elsewhere. */
function conversationGone(err, id) {
  if (!(err instanceof ApiError && err.status === 404)) return false;
  err.conversationGone = true;
  forgetConversation(id);
  return true;
}

function forgetConversation(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.current && state.current.id === id) {
    leaveConversation();
    state.current = null;
    sessionStorage.removeItem("chatstream.current");
    resetConversationActions();
    el.conversationActions.hidden = true;
    el.messageList.replaceChildren();
    el.messagesOlder.hidden = true;
    el.chatTitle.textContent = "No conversation selected";
    el.chatEmpty.hidden = false;
    el.chatBody.hidden = true;
    el.composer.hidden = true;
    el.chatAgent.hidden = true;
    showConversations(true);
  }
  renderConversations();
}

// -- renaming and deleting the selected conversation ----------------------------------

/** Back to the plain header: no rename form, no delete question. */
function resetConversationActions() {
  el.renameForm.hidden = true;
  el.deleteConfirm.hidden = true;
  el.chatTitle.hidden = false;
  el.conversationActions.hidden = !state.current;
  el.rename.disabled = false;
  el.del.disabled = false;
  el.deleteYes.disabled = false;
}

/** Puts a conversation the server answered in place of the one we had. */
function updateConversation(updated) {
  const known = state.conversations.find((c) => c.id === updated.id);
  if (known) Object.assign(known, updated);
  if (state.current && state.current.id === updated.id) {
    if (state.current !== known) Object.assign(state.current, updated);
    el.chatTitle.textContent = conversationLabel(state.current);
    showWhoAnswers(state.current);
  }
  renderConversations();
}

el.rename.addEventListener("click", () => {
  if (!state.current) return;
  resetConversationActions();
  el.conversationActions.hidden = true;
  el.chatTitle.hidden = true;
  el.renameForm.hidden = false;
  el.renameInput.value = state.current.title || "";
  el.renameInput.focus();
  el.renameInput.select();
});

function cancelRename() {
  resetConversationActions();
  el.rename.focus();
}

el.renameCancel.addEventListener("click", cancelRename);
el.renameForm.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    event.preventDefault();
    cancelRename();
  }
});

async function saveRename() {
  const conversation = state.current;
  if (!conversation) return;
  const title = el.renameInput.value.trim();
  let updated;
  try {
    updated = await api("PATCH", `/api/conversations/${conversation.id}`, { title: title || null });
  } catch (err) {
    conversationGone(err, conversation.id);
    showError(err, saveRename);
    return;
  }
  clearError();
  updateConversation(updated);
  if (state.current === conversation) {
    resetConversationActions();
    el.rename.focus();
  }
}

el.renameForm.addEventListener("submit", (event) => {
  event.preventDefault();
  saveRename();
});

el.del.addEventListener("click", () => {
  if (!state.current) return;
  resetConversationActions();
  el.conversationActions.hidden = true;
  el.deleteConfirm.hidden = false;
  el.deleteNo.focus();
});

el.deleteNo.addEventListener("click", () => {
  resetConversationActions();
  el.del.focus();
});
el.deleteConfirm.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    event.preventDefault();
    el.deleteNo.click();
  }
});

async function deleteConversation() {
  const conversation = state.current;
  if (!conversation) return;
  el.deleteYes.disabled = true;
  try {
    await api("DELETE", `/api/conversations/${conversation.id}`);
  } catch (err) {
    el.deleteYes.disabled = false;
    // Already gone: that is what was asked for.
    if (!(err instanceof ApiError && err.status === 404)) {
      showError(err, deleteConversation);
      return;
    }
  }
  clearError();
  forgetConversation(conversation.id);
  el.newConversation.querySelector("button[type=submit]").focus();
}

el.deleteYes.addEventListener("click", deleteConversation);

// -- messages ---------------------------------------------------------------------------

function authorName(m) {
  if (m.role === "user") return "You";
  if (m.role === "tool") return "Tool result";
  return agentName(state.current && state.current.agentId);
}

/** A stored message: its parts (an answer, a tool result) or its text as markdown. */
function messageNode(m) {
  const li = document.createElement("li");
  li.className = `message ${m.role}`;
  li.dataset.id = m.id;
  if (m.generationId) li.dataset.generationId = m.generationId;
  if (m.role === "tool" && m.parts && m.parts[0]) li.dataset.toolCallId = m.parts[0].toolCallId || "";
  const author = document.createElement("p");
  author.className = "author";
  author.textContent = authorName(m);
  const content = document.createElement("div");
  content.className = "content";
  content.id = `message-${m.id}-content`;
  li.append(author, content);
  li.message = m;
  if (m.role === "user") {
    renderMarkdown(content, m.effectiveContent);
  } else {
    // An edited answer: its parts other than text, then the edited text (docs/protocol.md).
    const parts = m.editedAt
      ? [...m.parts.filter((p) => p.kind !== "text"), { kind: "text", state: "complete", text: m.effectiveContent }]
      : m.parts;
    li.answer = new AnswerView(content);
    li.answer.setParts(parts && parts.length ? parts : [{ kind: "text", state: "complete", text: m.effectiveContent }]);
  }
  if (m.editedAt) {
    const marker = note("edited");
    marker.classList.add("edited");
    marker.title = `Edited ${formatTime(m.editedAt)}`;
    li.append(marker);
  }
  if (m.status === "partial") {
    li.classList.add("stopped");
    li.append(note(PARTIAL_KEPT)); // as it read live
  }
  addMessageActions(li, m);
  return li;
}

/** Who may edit: the author of a user message, or an admin (any message, agents' too). */
function canEdit(m) {
  if (!state.me || !m.id || m.role === "tool") return false;
  if (state.me.role === "admin") return true;
  return m.role === "user" && m.authorId === state.me.userId;
}

/** The buttons under a message: Copy and Answer again (an agent's answer), Edit (for those who may). */
function addMessageActions(li, m) {
  const old = li.querySelector(".message-actions");
  if (old) old.remove();
  const buttons = [];
  if (m.role === "agent") {
    buttons.push(actionButton("Copy", "copy", m, () => copyAnswer(li)));
    buttons.push(actionButton("Answer again", "regenerate", m, () => answerAgain()));
  }
  if (canEdit(m)) buttons.push(actionButton("Edit", "edit", m, () => startEdit(li, li.message || m)));
  if (!buttons.length) return;
  const actions = document.createElement("div");
  actions.className = "message-actions";
  actions.append(...buttons);
  li.append(actions);
}

function actionButton(text, className, m, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `secondary ${className}`;
  button.textContent = text;
  button.setAttribute("aria-describedby", `message-${m.id}-content`);
  button.addEventListener("click", onClick);
  return button;
}

/** The markdown of an answer (or the edited text), which is what a person pastes elsewhere. */
function answerText(li) {
  if (li.message && li.message.editedAt) return li.message.effectiveContent;
  return li.answer ? li.answer.text : li.message ? li.message.effectiveContent : "";
}

async function copyAnswer(li) {
  const button = li.querySelector(".message-actions .copy");
  try {
    await navigator.clipboard.writeText(answerText(li));
  } catch (err) {
    showError(new Error("Copying failed: this browser did not allow the page to use the clipboard."));
    return;
  }
  button.textContent = "Copied";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 2000);
}

/** The newest user message shown: the one an answer may be asked again for. */
function lastUserMessage() {
  const users = el.messageList.querySelectorAll(".message.user[data-id]");
  return users.length ? users[users.length - 1] : null;
}

/** "Answer again" is offered only under the newest answer, after the newest user message. */
function refreshAnswerAgain() {
  const nodes = [...el.messageList.querySelectorAll(".message")];
  const lastUser = lastUserMessage();
  const lastAnswer = nodes.filter((n) => n.classList.contains("agent") && n.dataset.id).pop();
  const idle = !state.live;
  for (const button of el.messageList.querySelectorAll(".message-actions .regenerate")) {
    const li = button.closest(".message");
    button.hidden = !(
      idle &&
      li === lastAnswer &&
      lastUser &&
      nodes.indexOf(li) > nodes.indexOf(lastUser) &&
      state.current &&
      state.current.agentId
    );
  }
}

/** Asks the agent again for the newest user message; the answer before stays in the list. */
async function answerAgain(messageId) {
  const conversation = state.current;
  const target = messageId || (lastUserMessage() && lastUserMessage().dataset.id);
  if (!conversation || !target) return;
  try {
    await api("POST", `/api/conversations/${conversation.id}/messages/${target}/answer`);
  } catch (err) {
    conversationGone(err, conversation.id);
    showError(err, () => answerAgain(target));
    return;
  }
  clearError();
  scrollToEnd(true); // the new answer arrives over the socket
}

function startEdit(li, m) {
  if (li.querySelector(".message-edit")) return;
  const content = li.querySelector(".content");
  const actions = li.querySelector(".message-actions");
  const form = document.createElement("form");
  form.className = "message-edit";
  const boxId = `message-${m.id}-edit`;
  const hintId = `message-${m.id}-edit-hint`;
  const label = document.createElement("label");
  label.htmlFor = boxId;
  label.textContent = "Edit message";
  const box = document.createElement("textarea");
  box.id = boxId;
  box.rows = 3;
  box.value = m.effectiveContent;
  box.setAttribute("aria-describedby", hintId);
  const hint = document.createElement("p");
  hint.id = hintId;
  hint.className = "hint";
  hint.textContent = "Ctrl+Enter saves, Escape cancels.";
  const row = document.createElement("div");
  row.className = "row-actions";
  const save = document.createElement("button");
  save.type = "submit";
  save.textContent = "Save";
  row.append(save);
  // Editing the newest question offers to have it answered again (the old answer stays above).
  const canResend = m.role === "user" && lastUserMessage() === li && state.current && state.current.agentId;
  let resend = null;
  if (canResend) {
    resend = document.createElement("button");
    resend.type = "button";
    resend.className = "resend";
    resend.textContent = "Save and answer again";
    row.append(resend);
  }
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "secondary";
  cancel.textContent = "Cancel";
  row.append(cancel);
  form.append(label, box, hint, row);

  const stop = () => {
    form.remove();
    if (content) content.hidden = false;
    if (actions) {
      actions.hidden = false;
      actions.querySelector(".edit").focus();
    }
  };
  const submit = async (again) => {
    save.disabled = true;
    if (resend) resend.disabled = true;
    let updated;
    try {
      updated = await api("PUT", `/api/conversations/${m.conversationId}/messages/${m.id}`, {
        content: box.value,
      });
    } catch (err) {
      save.disabled = false;
      if (resend) resend.disabled = false;
      showError(err, () => submit(again));
      return;
    }
    clearError();
    const replacement = messageNode(updated);
    li.replaceWith(replacement);
    refreshAnswerAgain();
    const edit = replacement.querySelector(".message-actions .edit");
    if (edit) edit.focus();
    if (again) await answerAgain(updated.id);
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit(false);
  });
  if (resend) resend.addEventListener("click", () => submit(true));
  cancel.addEventListener("click", stop);
  form.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      stop();
    } else if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target === box) {
      event.preventDefault();
      submit(false);
    }
  });

  if (content) content.hidden = true;
  if (actions) actions.hidden = true;
  li.insertBefore(form, actions || null);
  box.focus();
}

function note(text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  return p;
}

// -- tool calls the person answers ------------------------------------------------------

/**
 * The newest answer's tool calls that wait for a result (docs/protocol.md "Tool calls"): its
 * complete calls with no result inside the answer and no tool message after it, as long as no
 * user message came after it. Each gets a small form; answered ones lose theirs.
 */
function refreshToolForms() {
  const nodes = [...el.messageList.querySelectorAll(".message")];
  for (const form of el.messageList.querySelectorAll(".tool-answer")) form.remove();
  let index = nodes.length - 1;
  const answered = new Set();
  while (index >= 0 && nodes[index].classList.contains("tool")) answered.add(nodes[index--].dataset.toolCallId);
  const answer = nodes[index];
  if (!answer || !answer.classList.contains("agent") || !answer.answer || answer.classList.contains("live")) return;
  for (const call of answer.answer.completeToolCalls()) {
    if (answered.has(call.toolCallId) || answer.answer.answeredInside(call.toolCallId)) continue;
    call.node.append(toolAnswerForm(call));
  }
}

function toolAnswerForm(call) {
  const form = document.createElement("form");
  form.className = "tool-answer";
  const id = `tool-${call.toolCallId}-output`;
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = `Result for ${call.name || "the tool"} (JSON, or plain text)`;
  const box = document.createElement("textarea");
  box.id = id;
  box.rows = 2;
  const row = document.createElement("div");
  row.className = "row-actions";
  const send = document.createElement("button");
  send.type = "submit";
  send.textContent = "Send result";
  const fail = document.createElement("button");
  fail.type = "button";
  fail.className = "secondary";
  fail.textContent = "Report a failure";
  row.append(send, fail);
  form.append(label, box, row);
  const submit = async (failed) => {
    const conversation = state.current;
    if (!conversation) return;
    const body = { toolCallId: call.toolCallId };
    if (failed) body.error = box.value.trim() || "The person reported a failure.";
    else {
      try {
        body.output = JSON.parse(box.value);
      } catch (err) {
        body.output = box.value; // plain text is a JSON string
      }
    }
    send.disabled = fail.disabled = true;
    let posted;
    try {
      posted = await api("POST", `/api/conversations/${conversation.id}/tool-results`, body);
    } catch (err) {
      send.disabled = fail.disabled = false;
      showError(err, () => submit(failed));
      return;
    }
    clearError();
    showMessage(posted.message);
    refreshToolForms();
    scrollToEnd(true);
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit(false);
  });
  fail.addEventListener("click", () => submit(true));
  return form;
}

// -- following the open conversation ----------------------------------------------------

/**
 * Shows the newest message: always when `force` (the person opened a conversation or sent
 * something), else only while they are at the end; one who scrolled up to read is left there
 * and offered "Jump to latest".
 */
function scrollToEnd(force = false) {
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
function showWhoAnswers(conversation) {
  el.chatAgent.textContent = conversation.agentId
    ? `Answers come from ${agentName(conversation.agentId)}.`
    : "This conversation has no agent: nobody will answer here. Start a new conversation with an agent to get answers.";
  el.chatAgent.hidden = false;
}

async function selectConversation(conversation) {
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
  // from its start, and nothing said meanwhile falls between the two.
  live.subscribe(conversation.id);
  await loadMessages(conversation);
}

/** Reads the newest page of messages and merges it with what arrived live meanwhile. */
async function loadMessages(conversation) {
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

function leaveConversation() {
  if (state.current) live.unsubscribe(state.current.id);
  endLive();
}

/** Whatever changed in the list: the offers that depend on the newest message follow. */
function afterMessagesChanged() {
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
function showMessage(m) {
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

function replaceMessage(m) {
  const existing = el.messageList.querySelector(`.message[data-id="${m.id}"]`);
  if (!existing || existing.querySelector(".message-edit")) return; // someone is editing it here
  existing.replaceWith(messageNode(m));
  afterMessagesChanged();
}

// -- sending ----------------------------------------------------------------------------

async function send() {
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

function setStreaming(on, text) {
  el.stop.hidden = !on;
  el.stop.disabled = false;
  el.streamStatus.textContent = text || "";
}

/** A bubble for an answer that started in the open conversation (sent here or anywhere). */
function beginLive(generationId) {
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
function endLive() {
  const s = state.live;
  if (!s) return;
  state.live = null;
  s.bubble.classList.remove("streaming", "live");
  s.bubble.removeAttribute("aria-busy");
  setStreaming(false);
}

/** The answer ended: the bubble becomes the stored message (with its buttons), or says why not. */
function finishLive(s, event) {
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
function applyAnswerEvent(e) {
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

function onFrame(frame, request) {
  switch (frame.type) {
    case "ack":
    case "pong":
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
function onFrameRefused(frame, request) {
  if (!request || request.type !== "subscribe") return; // e.g. a server without the list feed
  if (frame.code === "not_found") goneElsewhere(request.conversationId);
  else if (frame.code === "invalid_cursor") live.subscribe(request.conversationId); // start over, without it
}

/** A conversation deleted in another tab, on a phone or over the API. */
function goneElsewhere(id) {
  const wasOpen = state.current && state.current.id === id;
  forgetConversation(id);
  if (wasOpen) {
    const err = new ApiError(404, { error: "gone" });
    err.conversationGone = true;
    showError(err);
  }
}

const live = new LiveSocket({
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
    showLogin();
    showError(new ApiError(401, { error: "Your session ended (signed out elsewhere, or the key was revoked). Sign in again." }));
  },
});

window.addEventListener("online", () => live.reconnectNow());

// A login link opened in a tab already showing the page only changes the fragment: it
// signs nobody in (a page could do that to an open tab unseen), the key just leaves the
// address bar. Opening the link in a new tab asks as above.
window.addEventListener("hashchange", takeLinkKey);

boot();
