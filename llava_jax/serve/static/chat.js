// The chat page: the whole conversation goes with every request (the server keeps no
// state); the image goes in the first user message, as a data URL; the answer streams in
// through server-sent events (OpenAI's chunk format).
"use strict";

const $ = (id) => document.getElementById(id);
let modelName = null;
let imageUrl = null;   // data: URL of the chosen image
let messages = [];     // the conversation so far, in OpenAI's format
let busy = false;

async function loadModel() {
  const response = await fetch("/v1/models");
  const body = await response.json();
  modelName = body.data[0].id;
  $("model").textContent = modelName;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function newChat() {
  messages = [];
  $("log").replaceChildren();
}

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    $("preview").src = imageUrl;
    $("preview").style.display = "block";
    newChat();  // a new image starts a new conversation
  };
  reader.readAsDataURL(file);
});

$("new-chat").addEventListener("click", newChat);

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || busy) return;
  busy = true;
  $("send").disabled = true;
  $("question").value = "";
  addMessage("user", question);
  const content = [{ type: "text", text: question }];
  if (messages.length === 0 && imageUrl) {
    content.unshift({ type: "image_url", image_url: { url: imageUrl } });
  }
  const turn = { role: "user", content };
  const answer = addMessage("assistant", "");
  answer.dataset.state = "streaming";
  try {
    const text = await streamAnswer([...messages, turn], answer);
    messages.push(turn, { role: "assistant", content: text });
    answer.dataset.state = "done";
  } catch (err) {
    answer.remove();
    addMessage("error", String(err.message || err));
  } finally {
    busy = false;
    $("send").disabled = false;
    $("question").focus();
  }
});

async function streamAnswer(conversation, element) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      model: modelName,
      messages: conversation,
      stream: true,
      max_tokens: Number($("max-tokens").value) || 256,
      temperature: Number($("temperature").value),
    }),
  });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new Error(body && body.error ? body.error.message : `HTTP ${response.status}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return text;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
        if (delta) {
          text += delta;
          element.textContent = text;
          element.scrollIntoView({ block: "end" });
        }
      }
    }
  }
  return text;
}

loadModel().catch((err) => addMessage("error", `cannot reach the server: ${err}`));
