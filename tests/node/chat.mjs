// One chat turn through the AI SDK's own client code: the `Chat` that `useChat` runs (here with a
// plain state instead of React's), its `DefaultChatTransport` and its stream parser.
//
//   node chat.mjs <package> send <api> <chatId> <text>   POST {api}: what sendMessage() does
//   node chat.mjs <package> resume <api> <chatId> <text> GET {api}/{chatId}/stream: resumeStream(),
//                                                        the history holding the user's <text>
//
// <package> is one of the `ai` versions in package.json. Prints one JSON line: the chat's status,
// error, messages, and what its onError / onFinish callbacks were given.
const [pkg, mode, api, chatId, text] = process.argv.slice(2);
const ai = await import(pkg);

setTimeout(() => {
  console.error(`chat.mjs: no answer after 20 s (${mode} ${api})`);
  process.exit(2);
}, 20_000).unref();

class State {
  constructor(messages = []) {
    this.messages = messages;
    this.status = "ready";
    this.error = undefined;
  }
  pushMessage = (message) => { this.messages = this.messages.concat(message); };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), this.snapshot(message), ...this.messages.slice(index + 1)];
  };
  snapshot = (value) => structuredClone(value);
}

class Chat extends ai.AbstractChat {
  constructor({ messages, ...init }) {
    super({ ...init, state: new State(messages) });
  }
}

const errors = [];
const finishes = [];
const chat = new Chat({
  id: chatId,
  messages: mode === "resume" ? [{ id: "user-1", role: "user", parts: [{ type: "text", text }] }] : [],
  transport: new ai.DefaultChatTransport({ api }),
  onError: (error) => errors.push(String(error?.message ?? error)),
  onFinish: ({ isAbort, isDisconnect, isError, finishReason }) =>
    finishes.push({ isAbort, isDisconnect, isError, finishReason }),
});

if (mode === "send") {
  await chat.sendMessage({ text });
} else if (mode === "resume") {
  await chat.resumeStream();
} else {
  throw new Error(`unknown mode ${mode}`);
}
console.log(JSON.stringify({ status: chat.status, error: chat.error?.message ?? null, messages: chat.messages,
                             errors, finishes }));
