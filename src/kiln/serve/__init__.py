"""`kiln serve`: an engine behind HTTP, speaking OpenAI's API (/v1) and Triton's KServe v2 (/v2).

Clients written for vLLM / the OpenAI SDK and for tensorrtllm_backend's Triton ensemble work against it
unchanged. `create_app` (app.py) builds the FastAPI app around an AsyncLLM; the CLI runs it with
uvicorn. Module map: app.py (assembly, auth, errors), engine_io.py (state, limits, running requests),
openai_api.py + openai_format.py + protocol.py (OpenAI), kserve.py (KServe v2), metrics.py (/metrics).
"""
