// Calls to the draft node's OpenAI-compatible API: a streamed completion as an async iterator of
// its SSE chunks, and errors (HTTP or mid-stream) as NodeError with the node's own message.

export class NodeError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function failure(response) {
  let message = response.statusText || "request failed";
  try {
    message = (await response.json()).error.message;
  } catch (_) { /* not a JSON error body */ }
  return new NodeError(response.status, message);
}

export async function getJSON(path, apiKey) {
  const response = await fetch(path, { headers: headers(apiKey) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function* streamCompletion(path, body, { apiKey, signal }) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST", headers: headers(apiKey), body: JSON.stringify({ ...body, stream: true }), signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new NodeError(0, `could not reach the node: ${err.message}`);
  }
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new NodeError(0, "the node closed the stream before it finished");
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new NodeError(chunk.error.code, chunk.error.message);
        yield chunk;
      }
    }
  }
}
