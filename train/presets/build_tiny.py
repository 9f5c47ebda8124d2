"""Regenerate the bundled ``tiny`` preset: a byte-level BPE tokenizer and a small LlamaConfig.

The preset holds no weights: train/train.py initialises the model randomly from
config.json (seeded). Both files are derived only from train/data/corpus.txt,
offline, and the output is deterministic: running this twice gives the same files.

    /tmp/scratch/tv/bin/python train/presets/build_tiny.py            # rewrite train/presets/tiny/
    /tmp/scratch/tv/bin/python train/presets/build_tiny.py --out DIR  # write somewhere else

Any python with `tokenizers` and `transformers` works. Writes into the output dir:
config.json, tokenizer.json, tokenizer_config.json (and whatever else
PreTrainedTokenizerFast.save_pretrained writes in the installed version).
"""
import argparse
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "corpus.txt"

# -----------------------------------------------------------------------------
# the preset, in one place
VOCAB_SIZE = 1024                   # BPE target, special tokens included
MIN_FREQUENCY = 2                   # a merge must be seen at least this often
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2
MODEL = dict(                       # LlamaConfig fields (vocab_size filled from the tokenizer)
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=256,
    max_position_embeddings=256,
    tie_word_embeddings=False,      # keeps ZeRO-3 export simple
    initializer_range=0.02,
)
# -----------------------------------------------------------------------------


def train_tokenizer(corpus: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the corpus' paragraphs; wrap it for transformers."""
    text = corpus.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs, trainer=trainer, length=len(paragraphs))
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
        model_max_length=MODEL["max_position_embeddings"],
    )


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(CORPUS)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    config.save_pretrained(out)
    print(f"wrote {out}: vocab {len(tokenizer)}, files {sorted(os.listdir(out))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "tiny", help="output directory (default: %(default)s)")
    build(parser.parse_args().out)
