"""SafeMoE in JAX / Flax NNX: a frozen base LM, one LoRA expert per harm domain (phase 1) and a
learned router that mixes them token by token (phase 2).

    core/        the model: config, decoder, the SafeMoE experts and router, sharding
    io/          weights, tokenizers and chat templates, pinned assets, the Hub, load_base
    data/        sources -> records and splits -> the two phases' sets -> tokens and batches
    train/       pure train steps, optimiser, checkpoints, the two-phase loop, RunDir
    infer/       batched generation with live routing
    evaluation/  benchmarks, systems, caches, statistics, the report
    judging/     labels, the judges, the learned judge and its workflow, the audit set
    tools/       benchmarks, TPU ahead-of-time checks, PEFT / merged export and import
    cli/         `safemoe <command>` (= `python -m safemoe_jax <command>`)
"""
