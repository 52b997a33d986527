"""maverick-generate / python -m maverick.generate: generate from an engine, print text and tokens/s."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maverick-generate", description=__doc__)
    p.add_argument("engine", help="engine directory (build_engine.py --output)")
    p.add_argument("prompts", nargs="*", help="prompts (text)")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--stream", action="store_true", help="print tokens as they come (first prompt only)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from maverick import LLM, SamplingParams
    from maverick.builder.engine_format import EngineError
    from maverick.runtime.sampling_params import InvalidRequest

    prompts = list(a.prompts)
    if a.prompt_file:
        prompts += [line for line in Path(a.prompt_file).read_text().splitlines() if line.strip()]
    if not prompts:
        print("error: no prompts; give them as arguments or with --prompt-file", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                min_p=a.min_p, seed=a.seed, stop=a.stop)
        with LLM(a.engine, device=a.device) as llm:
            t0 = time.perf_counter()
            if a.stream:
                for out in llm.generate_async(prompts[0], params, streaming=True):
                    print(out.outputs[0].text_diff, end="", flush=True)
                print()
                outputs = []
            else:
                outputs = llm.generate(list(prompts), params)
            dt = time.perf_counter() - t0
            for o in outputs:
                c = o.outputs[0]
                print(f"--- prompt: {o.prompt!r}\n{c.text!r}\n    tokens={c.token_ids} finish_reason={c.finish_reason}")
            n = sum(len(o.outputs[0].token_ids) for o in outputs)
            if outputs:
                print(f"generated {n} tokens for {len(outputs)} prompts in {dt:.2f} s: {n / dt:.1f} tokens/s")
        return 0
    except (InvalidRequest, EngineError, ValueError, RuntimeError) as e:  # RankFailure is a RuntimeError too
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
