"""Load an exported Hugging Face directory with transformers and answer a few chat prompts greedily.

    python generate.py HF_DIR [--max-new-tokens 40] [PROMPT ...]
"""

from __future__ import annotations

import argparse
import sys

PROMPTS = (
    "What does json.dumps do?",
    "What does os.path.join do?",
    "What does textwrap.dedent do?",
)


def generate(hf_dir: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy reply to each prompt (chat template applied, generation prompt added)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    replies = []
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        replies.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir")
    parser.add_argument("prompts", nargs="*", default=list(PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    for prompt, reply in zip(args.prompts, generate(args.hf_dir, args.prompts, args.max_new_tokens), strict=True):
        print(f"user:      {prompt}\nassistant: {reply}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
