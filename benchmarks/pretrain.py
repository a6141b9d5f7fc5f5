"""Stage-2 pre-training throughput: tokens/s and MFU of the real ``PretrainStage`` training step.

    python benchmarks/pretrain.py                                  # tiny model (experiments/tiny/pretrain.yaml), CPU
    python benchmarks/pretrain.py --preset 7b --layers 4 --devices 8 --strategy fsdp2 --precision bf16-mixed \
        --batch 4 --seq-len 2048 --activation-checkpointing        # Llama-2-7B-shaped layers under FSDP2 on GPUs

The step is the stage's own (packed rows, split vocabulary rows, AdamW groups, FSDP2 ``configure_model``
through Lightning's ``ModelParallelStrategy``), fed with random packed rows so the data pipeline is not
measured. Tokens/s counts every position of every row on all devices, timed over the steps after
``--warmup``; MFU = tokens/s × training FLOPs per token (``videolavit.llm.flops``) / the devices' peak
(Lightning's table for the GPU and precision; unknown on CPU, so not printed there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
from lightning.fabric.utilities.throughput import get_available_flops  # noqa: E402

from stages.pretrain import PretrainStage  # noqa: E402
from videolavit.config_files import read_config  # noqa: E402
from videolavit.llm.flops import model_flops_utilisation, training_flops_per_token  # noqa: E402
from videolavit.llm.text_tokenizer import build_tiny_tokenizer  # noqa: E402
from videolavit.llm.vocabulary import Vocabulary  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


class RandomPackedRows(torch.utils.data.IterableDataset):
    """Rows of ``seq_len`` random ids packed from documents of ``doc_len`` (the view's batch keys)."""

    def __init__(self, vocab_size: int, seq_len: int, doc_len: int, batch: int):
        self.vocab_size, self.seq_len, self.doc_len, self.batch = vocab_size, seq_len, doc_len, batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        positions = torch.arange(self.seq_len) % self.doc_len
        while True:
            ids = torch.randint(0, self.vocab_size, (self.batch, self.seq_len), generator=generator)
            labels = ids.clone()
            labels[:, positions == 0] = -100  # each document's first token has no target
            yield {"input_ids": ids, "labels": labels, "position_ids": positions.expand(self.batch, -1).clone()}


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.tokens = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.tokens += batch["input_ids"].numel() * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (7b: fewer than 32 to fit)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", choices=["auto", "fsdp2"], default="auto")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32-true on CPU")
    parser.add_argument("--batch", type=int, default=8, help="rows per device")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 384 tiny, 2048 7b")
    parser.add_argument("--doc-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    if args.preset == "tiny":
        tiny = read_config(REPO / "experiments/tiny/pretrain.yaml")["model"]["init_args"]
        vocabulary, llm_config = Vocabulary(**tiny["vocabulary"]), dict(tiny["llm_config"])
        seq_len = args.seq_len or 384
    else:
        vocabulary, llm_config = Vocabulary.release(), dict(LLAMA2_7B)
        seq_len = args.seq_len or 2048
    if args.layers:
        llm_config["num_hidden_layers"] = args.layers
    llm_config["max_position_embeddings"] = max(llm_config.get("max_position_embeddings", 0), seq_len)

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(Path(tmp) / "tok", ["a tokenizer only fills the text rows"], vocabulary.text_size)
        stage = PretrainStage(tokenizer_path=str(Path(tmp) / "tok"), vocabulary=vocabulary, llm_config=llm_config,
                              activation_checkpointing=args.activation_checkpointing,
                              fsdp_param_dtype="bfloat16" if args.strategy == "fsdp2" and "bf16" in precision else None)
        if args.strategy == "fsdp2":
            from lightning.pytorch.strategies import ModelParallelStrategy
            strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
        else:
            strategy = "auto"
        timer = StepTimer(args.warmup)
        trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=args.devices, strategy=strategy,
                             precision=precision, max_steps=args.warmup + args.steps, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=[timer])
        rows = RandomPackedRows(vocabulary.size, seq_len, args.doc_len, args.batch)
        trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(rows, batch_size=None))

    if trainer.global_rank != 0:
        return
    tokens_per_s = timer.tokens / timer.seconds
    flops = training_flops_per_token(stage.llm.config, seq_len)
    peak = None
    if cuda:
        dtype = torch.bfloat16 if "bf16" in precision else torch.float32
        per_device = get_available_flops(torch.device("cuda"), dtype)
        peak = per_device * trainer.world_size if per_device else None
    mfu = model_flops_utilisation(tokens_per_s, flops, peak)
    params = sum(p.numel() for p in stage.llm.parameters())  # FSDP2 DTensors report their global size
    print(f"preset={args.preset} layers={llm_config['num_hidden_layers']} params~{params / 1e6:.1f}M "
          f"devices={trainer.world_size} strategy={args.strategy} precision={precision} rows/device={args.batch} "
          f"seq_len={seq_len} checkpointing={args.activation_checkpointing}")
    print(f"tokens/s: {tokens_per_s:,.0f}  ({tokens_per_s / trainer.world_size:,.0f} per device)  "
          f"model TFLOP/s: {tokens_per_s * flops / 1e12:.3f}" + (f"  MFU: {mfu:.1%}" if mfu is not None else
                                                               "  MFU: n/a (peak FLOP/s unknown for this device)"))
    if cuda:
        print(f"peak memory (rank 0): {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
