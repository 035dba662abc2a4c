"""vLLM's offline engine behind a JSON-lines pipe: the other end of bench/vllm_peer.py.

It runs under the vLLM environment's Python (scripts/setup_vllm.sh), not verispec's, so it
imports nothing from verispec. The peer starts it as `python -P vllm_worker.py` (-P: this
folder, whose module names are generic, stays off sys.path).

Protocol, one JSON object per line:
  stdin, first line  {"engine": {LLM(...) keyword arguments}}
  stdout             {"ready": true, "vllm": version, "startup_s": s}   or {"error": "..."}
  stdin, then        {"prompt_ids": [...], "max_tokens": n, "temperature": t, "seed": s|null,
                      "stop_token_ids": [...]}
  stdout             {"token_ids": [...], "finish_reason": ..., "seconds": s,
                      "per_step_accepted": [...]|null, "per_step_drafted": [...]|null}
                     or {"error": "..."}
vLLM logs to stdout, so the protocol writes to a duplicate of the original stdout and fd 1
is pointed at stderr before vLLM is imported.
"""
import json
import os
import sys
import time
import traceback


def _protocol_out():
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else printed to stdout (vLLM's logs, its engine processes) goes to stderr
    sys.stdout = sys.stderr
    return out


def _send(out, message: dict) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _spec_steps(completion):
    metrics = getattr(completion, "spec_decode_metrics", None)
    if metrics is None:
        return None, None
    return list(metrics.per_step_accepted), list(metrics.per_step_drafted)


def _generate(llm, request: dict) -> dict:
    from vllm import SamplingParams

    temperature = float(request.get("temperature") or 0.0)
    params = SamplingParams(
        max_tokens=int(request["max_tokens"]), temperature=temperature,
        top_p=1.0, top_k=0, seed=request.get("seed") if temperature > 0 else None,
        stop_token_ids=list(request.get("stop_token_ids") or []), skip_special_tokens=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": list(request["prompt_ids"])}], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    completion = outputs[0].outputs[0]
    accepted, drafted = _spec_steps(completion)
    return {"token_ids": list(completion.token_ids), "finish_reason": completion.finish_reason,
            "seconds": seconds, "per_step_accepted": accepted, "per_step_drafted": drafted}


def main() -> int:
    out = _protocol_out()
    try:
        first = json.loads(sys.stdin.readline() or "{}")
        start = time.perf_counter()
        import vllm
        from vllm import LLM

        llm = LLM(**first["engine"])
    except BaseException as e:  # the peer reports why the engine did not start
        _send(out, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
        return 1
    _send(out, {"ready": True, "vllm": vllm.__version__, "startup_s": time.perf_counter() - start})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            _send(out, _generate(llm, json.loads(line)))
        except Exception as e:
            _send(out, {"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":  # vLLM's engine spawns processes that re-import the main module
    sys.exit(main())
