// Greedy continuations from a GGUF file in llama.cpp, through node-llama-cpp's prebuilt binary
// (tests/test_export.py drives it). Token ids in, token ids and top logits out, so the comparison
// with transformers does not depend on either side's tokenizer.
//
//   node llama_cpp_greedy.mjs NODE_LLAMA_CPP_PREFIX REQUEST.json
// REQUEST: {"models": [PATH or {"model": PATH, "lora": ADAPTER.gguf, "key": NAME}, ...],
//           "prompts": [[ids...], ...], "steps": N, "top": K}
// stdout:  {PATH or NAME: [{"tokens": [N ids], "top": [[[id, logit] x K] per step]} per prompt], ...}
// With "forced": [[ids...] per prompt] (teacher forcing), each prompt and its forced tokens are
// evaluated in one pass instead, and "tokens"/"top" are the top-1 and top K after the prompt and
// after each forced token but the last (one per forced token).
import path from "node:path";
import {readFileSync} from "node:fs";
import {pathToFileURL} from "node:url";

const [prefix, requestFile] = process.argv.slice(2);
const request = JSON.parse(readFileSync(requestFile, "utf8"));
const entry = path.join(prefix, "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);

// The prebuilt CPU binary only: never download or compile llama.cpp at run time. One thread: the
// tiny model gains nothing from more, and ggml's threads spin while they wait for each other,
// which on a shared machine costs several times the work.
const llama = await getLlama({gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
                              progressLogs: false, logLevel: LlamaLogLevel.error, maxThreads: 1});
const results = {};
for (const entry of request.models) {
    const {model: modelPath, lora, key} = typeof entry === "string" ? {model: entry, key: entry} : entry;
    const model = await llama.loadModel({modelPath, gpuLayers: 0});
    const context = await model.createContext({contextSize: 256, batchSize: 256, sequences: 1,
                                               ...(lora ? {lora: {adapters: [{filePath: lora}]}} : {})});
    const sequence = context.getSequence();
    const next = {logits: {filter: {tokens: [], includeTop: request.top}}};
    results[key] = [];
    for (const [index, prompt] of request.prompts.entries()) {
        await sequence.clearHistory();
        if (request.forced) {
            const all = prompt.concat(request.forced[index]);
            const first = prompt.length - 1, last = all.length - 2;  // the positions that predict a forced token
            const out = await sequence.controlledEvaluate(
                all.map((id, i) => (i >= first && i <= last ? [id, {generateNext: next}] : id)));
            const tokens = [], top = [];
            for (let i = first; i <= last; i++) {
                const logits = [...out[i].next.logits.entries()].sort((a, b) => b[1] - a[1]);
                tokens.push(logits[0][0]);
                top.push(logits.slice(0, request.top));
            }
            results[key].push({tokens, top});
            continue;
        }
        const tokens = [], top = [];
        let input = prompt.map((id, i) => (i === prompt.length - 1 ? [id, {generateNext: next}] : id));
        for (let step = 0; step < request.steps; step++) {
            const out = await sequence.controlledEvaluate(input);
            const logits = [...out[input.length - 1].next.logits.entries()].sort((a, b) => b[1] - a[1]);
            const best = logits[0][0];  // greedy: the highest raw logit
            tokens.push(best);
            top.push(logits.slice(0, request.top));
            input = [[best, {generateNext: next}]];
        }
        results[key].push({tokens, top});
    }
    await context.dispose();
    await model.dispose();
}
await llama.dispose();
process.stdout.write(JSON.stringify(results));
