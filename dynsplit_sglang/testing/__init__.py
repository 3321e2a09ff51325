"""Test doubles and helpers for the tests and the benchmarks; not used by the plugin itself.

- `fake_flashinfer`: torch stand-ins for FlashInfer's attention wrappers (CPU tests, GPU benchmarks' --smoke).
- `server`: starting `python -m sglang.launch_server` on loopback, killed with its process group after.
- `process_setup`: running a test's setup (`module:function`) in every SGLang process of an engine or
  server that the test starts, right after the plugin registered.

Importing this package must stay cheap and must not import SGLang: the GPU box imports the stand-ins
without SGLang installed (benchmarks/gpu/run_all.sh).
"""
