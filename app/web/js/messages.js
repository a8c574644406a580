// A message in the list: its content, its buttons (copy, answer again, edit) and tool answers.
import { AnswerView } from "./answer.js";
import { api } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { scrollToEnd, showMessage } from "./chat.js";
import { conversationGone } from "./conversations.js";
import { PARTIAL_KEPT, agentName, clearError, el, formatTime, note, showError, state } from "./page.js";

// -- messages ---------------------------------------------------------------------------

export function authorName(m) {
  if (m.role === "user") return "You";
  if (m.role === "tool") return "Tool result";
  return agentName(state.current && state.current.agentId);
}

/** A stored message: its parts (an answer, a tool result) or its text as markdown. */
export function messageNode(m) {
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
export function canEdit(m) {
  if (!state.me || !m.id || m.role === "tool") return false;
  if (state.me.role === "admin") return true;
  return m.role === "user" && m.authorId === state.me.userId;
}

/** The buttons under a message: Copy and Answer again (an agent's answer), Edit (for those who may). */
export function addMessageActions(li, m) {
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

export function actionButton(text, className, m, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `secondary ${className}`;
  button.textContent = text;
  button.setAttribute("aria-describedby", `message-${m.id}-content`);
  button.addEventListener("click", onClick);
  return button;
}

/** The markdown of an answer (its text parts: the edited text once edited), what a person pastes elsewhere. */
export function answerText(li) {
  return li.answer ? li.answer.text : li.message.effectiveContent;
}

export async function copyAnswer(li) {
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
export function lastUserMessage() {
  const users = el.messageList.querySelectorAll(".message.user[data-id]");
  return users.length ? users[users.length - 1] : null;
}

/** "Answer again" is offered only under the newest answer, after the newest user message. */
export function refreshAnswerAgain() {
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
export async function answerAgain(messageId) {
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

export function startEdit(li, m) {
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

// -- tool calls the person answers ------------------------------------------------------

/**
 * The newest answer's tool calls that wait for a result (docs/protocol.md "Tool calls"): its
 * complete calls with no result inside the answer and no tool message after it, as long as no
 * user message came after it. Each gets a small form; answered ones lose theirs.
 */
export function refreshToolForms() {
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

export function toolAnswerForm(call) {
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
