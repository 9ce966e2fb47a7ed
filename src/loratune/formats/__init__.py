"""Files for other tools: a merged HF model directory (``merged.py``), llama.cpp / Ollama GGUF files (``gguf.py``,
``gguf_model.py``, ``ollama.py``) and diffusers' LoRA files (``diffusers.py``). PEFT's adapter format is the adapters'
own (``loratune.adapters.files``)."""
