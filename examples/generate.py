"""Generate text-shaped token ids with a small, randomly initialised BasedLM.

    python examples/generate.py                 # greedy, on a GPU if there is one
    python examples/generate.py --temperature 0.8 --top-p 0.9

To run a released checkpoint instead, download its directory yourself and build the model with
`BasedLM.from_pretrained(path)`; everything below stays the same (add a tokenizer to see text).
"""
import argparse
import time

import torch

from based.models import BasedConfig, BasedLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # The based-360m layer pattern, shrunk: BaseConv everywhere except one linear-attention layer (1)
    # and one sliding-window layer (2), as in the released models' repeating groups of five.
    config = BasedConfig.from_preset("based-360m", d_model=256, n_layers=6, n_heads=4, linear_attention_layers=(1,),
                                     sliding_window_layers=(2,), window=64, vocab_size=1000)
    model = BasedLM(config).to(device=device, dtype=dtype).eval()
    print(f"BasedLM with {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device} ({dtype})")

    # A decode session owns the caches (and on a GPU the captured decode graph) for prompts of this batch size
    # and length: reusing it for several calls captures the graph once. `model.generate(prompt, n)` does the
    # same in one call, with a session it lets go afterwards; drop `session` to free its memory.
    session = model.decode_session(args.batch_size, args.prompt_len + args.new_tokens)
    for attempt in ("first call (captures the graph on a GPU)", "second call (replays it)"):
        prompt = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_len), device=device)
        start = time.perf_counter()
        tokens = session.generate(prompt, args.new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, progress=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"{attempt}: {args.batch_size * args.new_tokens / seconds:.0f} generated tokens/s (prefill included)")

    for row in tokens.tolist():
        print("prompt:", row[:args.prompt_len])
        print("  new: ", row[args.prompt_len:])


if __name__ == "__main__":
    main()
