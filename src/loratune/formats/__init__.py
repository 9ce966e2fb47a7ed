"""Files for other tools: a merged HF model directory (``merged.py``). PEFT's adapter format is the adapters' own
(``loratune.adapters.files``)."""
