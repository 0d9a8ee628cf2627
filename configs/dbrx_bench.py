"""The training benchmark on one GPU (H100 80 GB or H200 141 GB): dbrx-bench, DBRX's block at a
size one device holds (d_model 2048, 8 layers, 16 experts top-4, GQA 16/4, DBRX's 100k vocabulary;
3.3B parameters), batch 4 x 2048 tokens, bf16 compute on fp32 master weights and AdamW moments,
cuDNN's fused attention, the grouped GEMM that `auto` picks for the GPU, no remat. It is the
PERFORMANCE.md target (at least 50% MFU; 80k tokens/s on an H200):

    python -m benchmarks.bench_train --config=configs/dbrx_bench.py --compare_hf

Per device, from shapes (python -m benchmarks.mesh_report --config=configs/dbrx_bench.py
--meshes=data=1): parameters 12.3 GiB, AdamW moments 24.7 GiB, gradients 12.3 GiB: 49 GiB before
activations. It has not been compiled for a GPU: none was lent to this project yet, and XLA
compiles for a GPU only on one. bench_train prints the compiled memory plan (arguments,
temporaries, peak) next to its step time on the device it runs on; benchmarks/gpu_check.sh runs
it with the rest of the GPU checks.
"""

from dbrx_jax.experiment import base_config, model_section


def get_config():
    config = base_config()
    config.model = model_section(
        "dbrx-bench",
        dtype="bfloat16",
        param_dtype="float32",
        attention_impl="cudnn",
        remat_policy="none",
    )
    config.batch_size = 4
    config.seq_len = 2048
    return config
