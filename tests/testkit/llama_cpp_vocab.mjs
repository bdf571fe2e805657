// A GGUF file's vocabulary and chat template as llama.cpp uses them, through node-llama-cpp's
// prebuilt binary (tests/tools/test_export_formats.py drives it): the file loaded vocabulary-only,
// texts tokenized by llama.cpp's tokenizer, and conversations rendered as llama-server renders a
// chat: the file's own tokenizer.chat_template rendered whole (by @huggingface/jinja, the Jinja
// engine node-llama-cpp renders templates with) with add_generation_prompt, then the string
// tokenized by llama.cpp with special tokens parsed.
//
//   node llama_cpp_vocab.mjs NODE_LLAMA_CPP_PREFIX REQUEST.json
// REQUEST: {"model": PATH, "texts": [str, ...], "chats": [[{"role", "content"}, ...], ...]}
//          (each chat ends with a user message: the prompt the model answers)
// stdout:  {"texts": [[ids] per text], "chats": [[ids] per chat], "template": str}
import path from "node:path";
import {readFileSync} from "node:fs";
import {pathToFileURL} from "node:url";

const [prefix, requestFile] = process.argv.slice(2);
const request = JSON.parse(readFileSync(requestFile, "utf8"));
const entry = path.join(prefix, "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);
const jinja = path.join(prefix, "node_modules", "@huggingface", "jinja", "dist", "index.js");
const {Template} = await import(pathToFileURL(jinja).href);

const llama = await getLlama({gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
                              progressLogs: false, logLevel: LlamaLogLevel.error, maxThreads: 1});
const model = await llama.loadModel({modelPath: request.model, vocabOnly: true});
const template = model.fileInfo.metadata.tokenizer.chat_template;
const meta = model.fileInfo.metadata.tokenizer.ggml;
const piece = (id) => (id === undefined ? "" : meta.tokens[id]);
const render = new Template(template);
const chats = (request.chats || []).map((messages) => model.tokenize(
    render.render({messages, add_generation_prompt: true, bos_token: piece(meta.bos_token_id),
                   eos_token: piece(meta.eos_token_id)}), true));
const texts = (request.texts || []).map((text) => model.tokenize(text, false));
await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify({texts, chats, template}));
