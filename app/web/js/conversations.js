// The conversation list (load, filter, create, follow changes) and the open one's rename and delete.
import { ApiError, api, enc } from "./api.js";
import { leaveConversation, selectConversation, showWhoAnswers } from "./chat.js";
import { clearError, conversationLabel, el, formatTime, showConversations, showError, state } from "./page.js";

// -- agents and conversations ---------------------------------------------------------

export async function loadAgents() {
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

export function renderConversations() {
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

export async function loadConversations(reset) {
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

export async function createConversation() {
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
export function bumpConversation(id, when) {
  const index = state.conversations.findIndex((c) => c.id === id);
  if (index < 0) return;
  const [conversation] = state.conversations.splice(index, 1);
  state.conversations.unshift(conversation);
  if (when && (!conversation.lastMessageAt || when > conversation.lastMessageAt)) conversation.lastMessageAt = when;
  renderConversations();
}

/** A conversation made here or elsewhere: on top of the list, once. */
export function addConversation(conversation) {
  if (state.conversations.some((c) => c.id === conversation.id)) return;
  state.conversations.unshift(conversation);
  renderConversations();
}

/** A 404 about the conversation itself: it was deleted elsewhere. */
export function conversationGone(err, id) {
  if (!(err instanceof ApiError && err.status === 404)) return false;
  err.conversationGone = true;
  forgetConversation(id);
  return true;
}

export function forgetConversation(id) {
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
export function resetConversationActions() {
  el.renameForm.hidden = true;
  el.deleteConfirm.hidden = true;
  el.chatTitle.hidden = false;
  el.conversationActions.hidden = !state.current;
  el.rename.disabled = false;
  el.del.disabled = false;
  el.deleteYes.disabled = false;
}

/** Puts a conversation the server answered in place of the one we had. */
export function updateConversation(updated) {
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

export function cancelRename() {
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

export async function saveRename() {
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

export async function deleteConversation() {
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
