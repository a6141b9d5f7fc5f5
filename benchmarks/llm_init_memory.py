"""Peak host memory (RSS) per rank of building, sharding and exporting the stage-2 LLM under FSDP2.

    python benchmarks/llm_init_memory.py --path new --layers 4      # the stage: meta device + per-shard reads
    python benchmarks/llm_init_memory.py --path old --layers 4      # the previous code: from_pretrained fp32 per rank

``--world`` CPU processes (gloo, default 2) each build ``PretrainStage`` from a Llama-2-7B-shaped Hugging
Face directory (hidden 4096, intermediate 11008, 32 heads, the 32000-row text vocabulary resized to the
release layout's 49412 rows; ``--layers`` decoder layers, so that it fits a small machine) written once
into ``--workdir`` in ``--disk-dtype`` (Llama-2 ships 16-bit weights), shard it over a 1-D mesh, then
export it. ``--path old`` reproduces what ``stages/pretrain.py`` did before the meta-device loading:
``from_pretrained`` in fp32 on every rank, ``resize_token_embeddings`` (new rows set to the old rows' mean
instead of transformers' mean-resizing, whose covariance sampling takes many minutes and allocates no
more than the resized matrices), FSDP2, and an export that gathers
the full state dict on rank 0 and calls ``save_pretrained``. Each rank reports its peak RSS after
loading and after the export (``ru_maxrss``: peaks only grow). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.pretrain import PretrainStage, join_vocabulary_rows, split_vocabulary_rows  # noqa: E402
from videolavit.llm.sharded_weights import SafetensorsShardWriter  # noqa: E402
from videolavit.llm.text_tokenizer import build_tiny_tokenizer  # noqa: E402
from videolavit.llm.vocabulary import Vocabulary  # noqa: E402

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def write_source(directory: Path, shape: dict, layers: int, text_rows: int, dtype: torch.dtype) -> None:
    """A random Llama checkpoint written tensor by tensor (one output file's tensors in memory at a time)."""
    from transformers import LlamaConfig

    if (directory / "config.json").is_file():
        return
    config = LlamaConfig(vocab_size=text_rows, num_hidden_layers=layers, **shape)
    h, f = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (text_rows, h), "lm_head.weight": (text_rows, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                       f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
                       f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                       f"{p}.mlp.down_proj.weight": (h, f), f"{p}.input_layernorm.weight": (h,),
                       f"{p}.post_attention_layernorm.weight": (h,)})
    plan = [(name, torch.Size(s).numel() * dtype.itemsize) for name, s in shapes.items()]
    writer = SafetensorsShardWriter(directory, plan, max_bytes=1024**3)
    generator = torch.Generator().manual_seed(0)
    for name, s in shapes.items():
        value = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * 0.02
        writer.add(name, value.to(dtype))
    writer.close()
    config.dtype = dtype
    config.save_pretrained(directory)


def build_old(directory: str, vocabulary: Vocabulary, mesh):
    """The previous construction: the whole model in fp32 on every rank, then FSDP2."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    text_rows = llm.get_input_embeddings().weight.shape[0]
    # The old code mean-resized (new rows drawn around the old rows' mean and covariance); sampling from a
    # 4096-d covariance takes many minutes on a CPU and changes no memory figure, so the new rows here
    # are the old rows' mean: the same full fp32 model, resized, on every rank.
    llm.resize_token_embeddings(vocabulary.size, mean_resizing=False)
    with torch.no_grad():
        for matrix in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            matrix[text_rows:] = matrix[:text_rows].mean(dim=0)
    split_vocabulary_rows(llm, vocabulary.text_size)
    for layer in llm.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(llm, mesh=mesh)
    return llm


def export_old(llm, directory: Path, rank: int) -> None:
    """The previous export: the full state dict on rank 0, then ``save_pretrained``."""
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import LlamaForCausalLM

    state = get_model_state_dict(llm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    state = {k: v.to(torch.bfloat16) for k, v in join_vocabulary_rows(state).items()}
    config = copy.deepcopy(llm.config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(directory)


def worker(rank: int, args: argparse.Namespace, port: int, source: str, tokenizer: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=args.world)
    try:
        vocabulary = Vocabulary.release() if not args.tiny else Vocabulary(text_size=300, visual_codes=16,
                                                                           motion_codes=32)
        mesh = init_device_mesh("cpu", (args.world,), mesh_dim_names=("data_parallel",))
        baseline = peak_rss_gb()
        start = time.perf_counter()
        if args.path == "new":
            stage = PretrainStage(tokenizer_path=tokenizer, vocabulary=vocabulary, llm_path=source,
                                  load_dtype="float32", export_dtype="bfloat16")
            stage._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
            stage.configure_model()
            llm = stage.llm
        else:
            llm = build_old(source, vocabulary, mesh)
        torch.distributed.barrier()
        load_s = time.perf_counter() - start
        after_load = peak_rss_gb()
        export_dir = Path(out) / f"export_{args.path}"
        if args.path == "new":
            stage.export(export_dir)
        else:
            export_old(llm, export_dir, rank)
        torch.distributed.barrier()
        local = sum(p.to_local().numel() * p.element_size() for p in llm.parameters())
        result = {"rank": rank, "baseline_rss_gb": baseline, "peak_rss_after_load_gb": after_load,
                  "peak_rss_after_export_gb": peak_rss_gb(), "load_s": load_s, "local_param_gb": local / 1024**3}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=["new", "old"], default="new")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Llama-2-7B has 32)")
    parser.add_argument("--world", type=int, default=2, help="CPU processes (ranks)")
    parser.add_argument("--disk-dtype", default="bfloat16", help="dtype of the written source checkpoint")
    parser.add_argument("--workdir", default=None, help="keeps the source checkpoint between runs (default: temp)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a correctness check of this script)")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        shape, text_rows = (TINY, 300) if args.tiny else (SHAPE_7B, Vocabulary.release().text_size)
        source = work / f"source_{'tiny' if args.tiny else '7b'}_{args.layers}l"
        write_source(source, shape, args.layers, text_rows, getattr(torch, args.disk_dtype))
        tokenizer = work / f"tokenizer_{text_rows}"
        if not tokenizer.is_dir():
            build_tiny_tokenizer(tokenizer, ["a red circle moves left", "a blue square"], vocab_size=text_rows)
        out = Path(scratch) / "out"
        out.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(args, port, str(source), str(tokenizer), str(out)), nprocs=args.world, join=True)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.world)]
    print(f"{'rank':>4} {'baseline GB':>12} {'peak after load GB':>19} {'peak after export GB':>21} "
          f"{'local params GB':>16} {'load s':>7}")
    for r in ranks:
        print(f"{r['rank']:>4} {r['baseline_rss_gb']:>12.2f} {r['peak_rss_after_load_gb']:>19.2f} "
              f"{r['peak_rss_after_export_gb']:>21.2f} {r['local_param_gb']:>16.2f} {r['load_s']:>7.1f}")
    if args.path == "old":
        print("note: --path old resizes the embeddings without transformers' mean-resizing (new rows = the old "
              "rows' mean); the full fp32 model is still materialised on every rank")
    summary = {"path": args.path, "layers": args.layers, "world": args.world, "tiny": args.tiny,
               "peak_rss_gb_per_rank": [round(r["peak_rss_after_export_gb"], 3) for r in ranks],
               "peak_rss_after_load_gb_per_rank": [round(r["peak_rss_after_load_gb"], 3) for r in ranks],
               "new_embedding_rows": "old rows mean" if args.path == "old" else "mean-resized"}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
