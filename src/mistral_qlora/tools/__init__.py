"""The commands around training, one module each.

- prepare.py           `prepare`: validate the data and report its statistics, per source and mix
- generate.py          `generate`: greedy answers from an adapter, a plain or a merged model
- merge.py             `merge`: an adapter folded into a 16-bit copy of its base (`load_merged`, shared with export)
- export.py            `export`: the merged model as one GGUF file (with an Ollama Modelfile) or safetensors
- gguf_file.py         a Mistral-architecture model written as one GGUF file for llama.cpp
- env.py               `env`: versions, GPUs, usable attention backends and kernels
- config_reference.py  docs/config.md, generated from the run config's schema

The benchmarks (`bench`, `bench-data`) live in bench/.
"""
