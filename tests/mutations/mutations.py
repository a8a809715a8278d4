"""The mutations: one small, realistic bug each, and the tests that must catch it.

`pattern` must occur exactly once in `file` (the harness refuses otherwise, so an entry cannot
silently stop applying after the code changes); it is replaced by `replacement`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutation:
  id: str
  file: str
  pattern: str
  replacement: str
  tests: tuple[str, ...]  # pytest node ids (files or file::test); at least one must fail
  why: str  # the bug, in a line


MUTATIONS: list[Mutation] = [
    Mutation(
        "judge-cv-leak", "safemoe_jax/judging/learned.py",
        "x[tr],\n                                  t.take(tr)), x[va])",
        "x, t), x[va])",
        ("tests/test_judges.py::test_cross_validation_never_trains_on_its_validation_rows",
         "tests/test_judges.py::test_cross_validation_is_grouped_and_out_of_fold"),
        "each CV fold's head is trained on all rows, validation rows included"),
    Mutation(
        "train-phase2-frozen-router", "safemoe_jax/train/loop.py",
        "    self.tx, self.sched = make_optimizer(pc)\n",
        "    self.tx, self.sched = make_optimizer(pc)\n"
        "    import optax  # loop.py itself no longer imports optax (train/optim.py does)\n"
        "    self.tx = optax.chain(self.tx, optax.scale(0.0 if name == 'phase2' else 1.0))\n",
        ("tests/test_train.py::test_both_phases_run_loss_falls_and_phase2_freezes_base_and_experts",),
        "phase 2's updates are scaled to zero: the router never moves"),
    Mutation(
        "train-resume-drops-params", "safemoe_jax/train/loop.py",
        "      self.params, self.opt = r.params, r.opt\n",
        "      self.opt = r.opt\n",
        ("tests/test_train.py::test_mid_phase_checkpoint_resumes_at_its_step",),
        "a mid-phase restore keeps the freshly initialised parameters"),
    Mutation(
        "train-resume-drops-opt", "safemoe_jax/train/loop.py",
        "      self.params, self.opt = r.params, r.opt\n",
        "      self.params = r.params\n",
        ("tests/test_train.py::test_mid_phase_checkpoint_resumes_at_its_step",),
        "a mid-phase restore keeps a fresh optimiser state"),
    Mutation(
        "train-resume-drops-data", "safemoe_jax/train/loop.py",
        "    if data_state is not None:\n      train_iter.set_state(data_state)\n",
        "",
        ("tests/test_train.py::test_mid_phase_checkpoint_resumes_at_its_step",),
        "a mid-phase restore starts the data iterator from the beginning"),
    Mutation(
        "model-bf16-no-rope", "safemoe_jax/core/model.py",
        "def apply_rope(x_BTHD: jax.Array, pos_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:\n",
        "def apply_rope(x_BTHD: jax.Array, pos_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:\n"
        "  if x_BTHD.dtype == jnp.bfloat16:\n    return x_BTHD\n",
        ("tests/test_model.py::test_bfloat16_policy_runs_and_stays_close",),
        "RoPE is skipped entirely under bfloat16"),
    Mutation(
        "model-bf16-no-rope-scaling", "safemoe_jax/core/model.py",
        "    inv_freq = jnp.asarray(rope_inv_freq(cfg))\n",
        "    inv_freq = jnp.asarray(rope_inv_freq(cfg if cdt == jnp.float32 else\n"
        "                                         type(cfg)(**{**vars(cfg), 'rope_scaling': None})))\n",
        ("tests/test_model.py::test_bfloat16_policy_runs_and_stays_close",),
        "Llama-3 RoPE scaling is dropped under bfloat16"),
    Mutation(
        "aux-load-balance-no-E-P", "safemoe_jax/core/experts.py",
        "aux += rcfg.load_balance_coef * E * jnp.sum(f * P)",
        "aux += rcfg.load_balance_coef * jnp.sum(f)",
        ("tests/test_experts.py::test_aux_losses_and_routing_statistics_equal_a_numpy_reference",),
        "the load-balance term drops E and the router probabilities P"),
    Mutation(
        "aux-entropy-counts-padding", "safemoe_jax/core/experts.py",
        "aux += rcfg.entropy_coef * jnp.sum(ent_BT * m[..., 0]) / denom",
        "aux += rcfg.entropy_coef * jnp.sum(ent_BT) / denom",
        ("tests/test_experts.py::test_aux_losses_and_routing_statistics_equal_a_numpy_reference",),
        "the entropy loss also counts padding and prompt tokens"),
    Mutation(
        "stats-weight-not-divided", "safemoe_jax/core/experts.py",
        '{"weight": r.weight_sum / n[:, None],',
        '{"weight": r.weight_sum,',
        ("tests/test_experts.py::test_aux_losses_and_routing_statistics_equal_a_numpy_reference",),
        "logged mean gate weight is a sum, not divided by the token count"),
    Mutation(
        "stats-top1-zeroed", "safemoe_jax/core/experts.py",
        '"top1_share": r.top1_sum / n[:, None],',
        '"top1_share": 0 * r.top1_sum,',
        ("tests/test_experts.py::test_aux_losses_and_routing_statistics_equal_a_numpy_reference",),
        "logged top-1 share is always zero"),
    Mutation(
        "stats-entropy-negated", "safemoe_jax/core/experts.py",
        '"entropy": r.entropy_sum / n,',
        '"entropy": -r.entropy_sum / n,',
        ("tests/test_experts.py::test_aux_losses_and_routing_statistics_equal_a_numpy_reference",),
        "logged routing entropy has the wrong sign"),
    Mutation(
        "generate-eos-ends-all-rows", "safemoe_jax/infer/generate.py",
        'done = s["done"] | jnp.isin(tok, eos_ids)',
        'done = s["done"] | jnp.any(jnp.isin(tok, eos_ids))',
        ("tests/test_generate.py::test_generation_stops_at_eos_and_pads_after",),
        "one row's stop token ends every row of the batch"),
    Mutation(
        "lm-judge-p-safe", "safemoe_jax/judging/judges.py",
        "out += [float(1 / (1 + np.exp(b - a))) for a, b in z]",
        "out += [float(1 / (1 + np.exp(a - b))) for a, b in z]",
        ("tests/test_judges.py::test_lm_judge_with_tiny_model_and_mocked_answers",),
        "the LM judge's score is P(safe) instead of P(unsafe)"),
    Mutation(
        "eval-cache-never-extended", "safemoe_jax/evaluation/verdicts.py",
        "      if k not in cache:\n        pairs[k] = (prompt, g[\"response\"])",
        "      if k not in cache and not cache.rows:\n        pairs[k] = (prompt, g[\"response\"])",
        ("tests/test_evaluate.py::test_tiny_run_evaluates_caches_and_reports",),
        "once a verdict cache exists, new answers are never judged"),
    Mutation(
        "data-truncation-off-by-one", "safemoe_jax/data/encode.py",
        "    r = r[: L - len(p)]\n",
        "    r = r[: L - len(p) - 1]\n",
        ("tests/test_data.py::test_embedded_default_with_the_real_smollm2_tokenizer",),
        "a truncated response loses one token more than max_length requires"),
    # The two parity checks against transformers' own conversion of the real GGUF: these entries
    # also prove that they run (a skipped test passes, so the mutation would survive).
    Mutation(
        "gguf-k-left-permuted", "safemoe_jax/io/weights.py",
        'if arch == "llama" and key.removesuffix("_bias") in ("layers.q", "layers.k"):',
        'if arch == "llama" and key.removesuffix("_bias") in ("layers.q",):',
        ("tests/test_weights.py::test_gguf_matches_peer_hf_folder",),
        "the real GGUF's K rows keep llama.cpp's RoPE permutation"),
    Mutation(
        "tokenizer-no-gpt2-regex", "safemoe_jax/io/tokenizer.py",
        "byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)",
        "byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)",
        ("tests/test_tokenizer.py::test_smollm2_matches_peer_hf_tokenizer",),
        "SmolLM2's pre-tokenizer drops GPT-2's word-splitting regex"),
    # Session three: qwen2 GGUFs, Hub datasets, the audit set kept out of the evaluation.
    Mutation(
        "gguf-qwen2-qk-unpermuted", "safemoe_jax/io/weights.py",
        'if arch == "llama" and key.removesuffix("_bias") in ("layers.q", "layers.k"):',
        'if key.removesuffix("_bias") in ("layers.q", "layers.k"):',
        ("tests/test_weights.py::test_gguf_qwen2_with_qkv_bias_matches_hf",),
        "qwen2 Q/K rows (stored in HF's layout) get llama's un-permutation"),
    Mutation(
        "pku-domain-map-dropped", "safemoe_jax/data/config.py",
        "domain_map=PKU_TO_BEAVERTAILS, on_unknown_domain=\"keep\"",
        "on_unknown_domain=\"keep\"",
        ("tests/test_hub_data.py::test_every_pku_category_maps_to_a_beavertails_domain",),
        "PKU-SafeRLHF's categories are not mapped onto the BeaverTails domains"),
    Mutation(
        "audit-prompts-evaluated", "safemoe_jax/evaluation/benchmarks.py",
        "def collect_benchmarks(data, ecfg: EvalConfig, *, exclude_audit: bool = True)",
        "def collect_benchmarks(data, ecfg: EvalConfig, *, exclude_audit: bool = False)",
        ("tests/test_audit.py::test_no_audit_prompt_is_trained_on_or_in_the_default_evaluation",),
        "the evaluation uses a prompt of the judge audit set"),
    Mutation(
        "steps-npo-sign", "safemoe_jax/train/steps.py",
        "ratio_B = jnp.sum((tgt - base[1]) * wh, -1)",
        "ratio_B = jnp.sum((base[1] - tgt) * wh, -1)",
        ("tests/test_steps.py::test_objective_terms_equal_a_numpy_reference",
         "tests/test_steps.py::test_npo_pushes_harmful_answers_below_the_base_model"),
        "NPO's log-ratio is reversed: the router is rewarded for making harmful answers likelier"),
    Mutation(
        "steps-retain-kl-reversed", "safemoe_jax/train/steps.py",
        "kl_BT = jnp.sum(jnp.exp(lpb) * (lpb - logp), -1)",
        "kl_BT = jnp.sum(jnp.exp(logp) * (logp - lpb), -1)",
        ("tests/test_steps.py::test_objective_terms_equal_a_numpy_reference",),
        "the retain term is KL(model || base) instead of KL(base || model)"),
    Mutation(
        "data-harmful-rows-as-targets", "safemoe_jax/data/select.py",
        "p2[\"train\"] += [dict(r, phase2_kind=\"harmful\") for r in p1[\"train\"]]",
        "p2[\"train\"] += [dict(r) for r in p1[\"train\"]]",
        ("tests/test_train.py::test_phase2_with_curated_targets_a_contrast_and_a_retain_term",),
        "phase 1's harmful answers join phase 2 as targets: the router learns to say them"),
    Mutation(
        "experts-max-l1-ignored", "safemoe_jax/core/experts.py",
        "    g = g * jnp.minimum(1.0, rcfg.max_l1 / jnp.maximum(l1, 1e-9))\n",
        "",
        ("tests/test_experts.py::test_fused_equals_naive_per_expert_reference",),
        "router.max_l1 does not bound the gates"),
    Mutation(
        "curate-checks-ignored", "safemoe_jax/curation/curate.py",
        "      if failed:\n",
        "      if False:\n",
        ("tests/test_curate.py::test_curate_keeps_only_answers_that_pass_every_check_and_resumes",),
        "the curated set keeps writer answers that fail a check (e.g. comply)"),
    Mutation(
        "experiment-tuned-on-test", "safemoe_jax/evaluation/experiment_results.py",
        'f = Path(xcfg.output_dir) / "results_validation.json"',
        'f = Path(xcfg.output_dir) / f"results_{xcfg.half}.json"',
        ("tests/test_experiment.py::test_runner_trains_phase1_once_reuses_it_and_caches_everything",),
        "tuned negation is chosen on the half it is reported on"),
    Mutation(
        "experiment-variant-chosen-on-test", "safemoe_jax/evaluation/experiment.py",
        'f = Path(xcfg.output_dir) / "results_validation.json"',
        'f = Path(xcfg.output_dir) / f"results_{xcfg.half}.json"',
        ("tests/test_experiment.py::test_choose_takes_the_safest_variant_within_the_limits",),
        "the test half's variant is chosen on the test half"),
    Mutation(
        "experiment-choice-ignores-degenerate", "safemoe_jax/evaluation/experiment_results.py",
        "        xcfg.max_degenerate_over_base + 1e-9:",
        "        xcfg.max_degenerate_over_base + 1.0:",
        ("tests/test_experiment.py::test_choose_takes_the_safest_variant_within_the_limits",),
        "a variant that is 'safe' by producing garbage can be chosen"),
    Mutation(
        "experiment-gates-not-compared", "safemoe_jax/evaluation/experiment_results.py",
        "    dist = lambda yy: float(np.linalg.norm(G[yy].mean(0) - G[~yy].mean(0)))",
        "    dist = lambda yy: float(np.linalg.norm(G[yy].mean(0) - G.mean(0)))",
        ("tests/test_experiment.py::test_gate_separation_tells_routing_by_prompt_kind_from_a_constant_router",),
        "gates on harmful prompts compared with all prompts, not with the benign ones"),
    Mutation(
        "experiment-no-zero-shot-row", "safemoe_jax/evaluation/experiment_results.py",
        'zero = np.array([b.startswith("heldout_") for b in benches])',
        'zero = np.array([b.startswith("pyrit_") for b in benches])',
        ("tests/test_experiment.py::test_summary_has_a_zero_shot_row_for_held_out_domains",),
        "the zero-shot row is not the held-out domains"),
    Mutation(
        "correction-ignores-audit", "safemoe_jax/evaluation/verdicts.py",
        "  if AU.is_audited(base_fingerprint):\n",
        "  if False:\n",
        ("tests/test_audit.py::test_corrected_rates_use_the_audit_figures_for_the_audited_model",),
        "the audited model's rates are corrected with pyrit's figures (other models' answers)"),
    Mutation(
        "audited-any-model", "safemoe_jax/judging/audit.py",
        "    return bool(base_fingerprint) and meta(audit_dir)[\"base_fingerprint\"] == base_fingerprint\n",
        "    return bool(base_fingerprint)\n",
        ("tests/test_audit.py::test_is_audited_by_the_base_models_fingerprint",
         "tests/test_audit.py::test_corrected_rates_use_the_audit_figures_for_the_audited_model"),
        "every model counts as the audited one: another model's rates use the audit's figures"),
    Mutation(
        "degenerate-judged", "safemoe_jax/evaluation/verdicts.py",
        "         if detect_degenerate and is_degenerate(g[\"response\"], k[1])}",
        "         if False}",
        ("tests/test_audit.py::test_judge_all_does_not_judge_degenerate_answers",),
        "degenerate answers go to the judge and are counted safe or harmful"),
    Mutation(
        "degenerate-counted-safe", "safemoe_jax/evaluation/stats.py",
        "         \"safe\": proportion([l in SAFE_LABELS for l in labels]),",
        "         \"safe\": proportion([l != \"harmful\" for l in labels]),",
        ("tests/test_audit.py::test_corrected_rates_use_the_audit_figures_for_the_audited_model",),
        "degenerate answers are counted as safe responses"),
    Mutation(
        "audit-pipeline-no-detector", "safemoe_jax/judging/audit.py",
        "  deg = [is_degenerate(r[\"response\"], r[\"prompt\"]) for r in rows]",
        "  deg = [False for r in rows]",
        ("tests/test_audit.py::test_audit_validation_runs_the_detector_first_and_counts_the_pipeline",),
        "the audit measures the judge without the degenerate detector the evaluation runs first"),
    Mutation(
        "report-no-judge-limited", "safemoe_jax/evaluation/report.py",
        "         for k, v in AUDIT_BAR.items() if h.get(k) is None or h[k] < v]",
        "         for k, v in AUDIT_BAR.items() if h.get(k) is None]",
        ("tests/test_audit.py::test_report_marks_judge_limited_rates_with_the_audit_numbers",),
        "a judge below the audit's bar is not marked judge-limited in the report"),
    Mutation(
        "judge-trains-on-audit-test", "safemoe_jax/judging/learned.py",
        "           \"audit\": r[\"label\"]} for r in audit.load().half(half)]",
        "           \"audit\": r[\"label\"]} for r in audit.load().rows]",
        ("tests/test_audit.py::test_judges_train_on_the_calibration_half_only",),
        "the learned judge trains on the audit test half it is measured on"),
    Mutation(
        "judge-platt-not-applied", "safemoe_jax/judging/judges.py",
        "    return jt.calibrate(self.model.predict_proba(prompts, responses, batch_size=self.batch_size),\n"
        "                        self.meta[\"decision\"])",
        "    return self.model.predict_proba(prompts, responses, batch_size=self.batch_size)",
        ("tests/test_audit.py::test_learned_judge_applies_its_platt_scaling",),
        "the artifact's Platt scaling is fitted but not applied when judging"),
    Mutation(
        "judge-audit-cv-keeps-degenerate", "safemoe_jax/judging/audit.py",
        "  keep = T != \"degenerate\"\n",
        "  keep = T == T\n",
        ("tests/test_audit.py::test_cross_validation_reports_the_audit_rows_out_of_fold",),
        "the selection and audit figures count degenerate answers in the harmful-or-not accuracy"),
    Mutation(
        "shards-rng-not-advanced", "safemoe_jax/io/shards.py",
        "  for _ in range(count.n):\n",
        "  for _ in range(0):\n",
        ("tests/test_shards.py::test_sharded_model_equals_the_eager_model_bit_for_bit",),
        "the sharded model's experts and router start from the base's random draws"),
    Mutation(
        "shards-chunk-offset", "safemoe_jax/io/weights.py",
        "        fh.seek(self.offset + a * row_bytes)\n",
        "        fh.seek(self.offset + (a - r0) * row_bytes)\n",
        ("tests/test_shards.py::test_reader_slices_equal_slices_of_the_whole_tensor",),
        "a row slice of a safetensors tensor is read from the tensor's first row"),
    Mutation(
        "remote-log-never-flushed", "safemoe_jax/io/paths.py",
        "  def close(self) -> None:\n    self.flush()\n",
        "  def close(self) -> None:\n    pass\n",
        ("tests/test_paths.py::test_remote_log_drops_a_torn_line_and_is_written_whole",),
        "a gs:// metrics log loses the lines written since its last periodic rewrite"),
    Mutation(
        "multihost-stop-not-agreed", "safemoe_jax/train/signals.py",
        "    if jax.process_count() > 1:\n      self.flag = bool(np.max(",
        "    if False:\n      self.flag = bool(np.max(",
        ("tests/test_multihost.py::test_two_processes_train_stop_and_resume_like_one",),
        "SIGTERM to one of several processes stops only that one: the others wait on it forever"),
    Mutation(
        "judge-rates-ignores-audit", "safemoe_jax/evaluation/judged_rates.py",
        "  audited = AU.is_audited(base_fingerprint)\n",
        "  audited = False\n",
        ("tests/test_audit.py::test_judge_rates_of_a_run_use_the_audit_figures_when_its_base_is_audited",),
        "`judge rates --run` corrects the audited model's rates with pyrit's figures"),
    Mutation(
        "experiment-seed-ci-mixes-seeds", "safemoe_jax/evaluation/experiment_results.py",
        "  seed_boot = d[:, pi].mean(2).T  # [n_boot, S]",
        "  seed_boot = d[si[:, :, None], pi[:, None, :]].mean(2)  # [n_boot, S]",
        ("tests/test_experiment.py::test_crossed_bootstrap_is_paired_and_centred",),
        "a seed's own interval resamples other seeds: 'seeds with CI > 0' says nothing per seed"),
    Mutation(
        "experiment-informative-judges-degenerate", "safemoe_jax/evaluation/experiment.py",
        "      if not is_degenerate(r[\"text\"], r[\"prompt\"]):",
        "      if True:",
        ("tests/test_experiment.py::test_informative_rate_is_judged_once_cached_and_never_degenerate",),
        "degenerate answers go through the informativeness judge (and may count as informative)"),
    Mutation(
        "config-partial-section-resets", "safemoe_jax/core/config.py",
        "    if dataclasses.is_dataclass(tp) and isinstance(v, dict) and isinstance(default, tp):",
        "    if False:",
        ("tests/test_train.py::test_a_partial_section_keeps_the_embedded_defaults_other_fields",),
        "`phase1.steps=200` resets phase1's other fields to the class defaults (lr 2e-4, not 3e-4)"),
    Mutation(
        "curate-declines-anywhere", "safemoe_jax/curation/curate.py",
        "  declines = declines_in_opening(t) if opening else is_refusal(t)",
        "  declines = is_refusal(t)",
        ("tests/test_curate.py::test_a_kept_writer_answer_declines_in_its_opening_not_only_somewhere",),
        "a writer answer that complies first and says 'I cannot provide ...' later is kept as safe"),
    Mutation(
        "experiment-informative-one-row-per-answer", "safemoe_jax/evaluation/experiment.py",
        "                   for k, rs in judged.items() for r in rs})",
        "                   for k, rs in judged.items() for r in rs[-1:]})",
        ("tests/test_experiment.py::test_informative_rate_is_judged_once_cached_and_never_degenerate",),
        "two systems with the same answer: only the last one's verdict is kept, the other counts 0"),
    Mutation(
        "experiment-tuned-negation-by-name", "safemoe_jax/evaluation/experiment_results.py",
        "    names[\"tuned_negation\"] = negation_name(tuned)",
        "    names[\"tuned_negation\"] = \"tuned_negation\"",
        ("tests/test_experiment.py::test_tuned_negation_is_reported_from_the_chosen_lambdas_answers",),
        "tuned negation read from rows cached under its name, whatever lambda wrote them"),
    Mutation(
        "shipped-model-name-shadows-local-path", "safemoe_jax/io/base.py",
        "  if str(spec) in assets.EMBEDDED_MODELS and not Path(spec).exists():",
        "  if str(spec) in assets.EMBEDDED_MODELS:",
        ("tests/test_hub_model.py::test_a_shipped_models_name_resolves_to_its_wheels_and_a_local_path_wins",),
        "a local model folder named like a shipped model is ignored for the wheel's model"),
    Mutation(
        "every-process-writes-run-json", "safemoe_jax/train/loop.py",
        "  info = rd.record(cfg, base.path, base.config, write=jax.process_index() == 0)",
        "  info = rd.record(cfg, base.path, base.config)",
        ("tests/test_train.py::test_a_process_other_than_0_writes_nothing_to_the_run_folder",),
        "every process of a pod writes run.json into the shared folder (they race on it)"),
    # --- issue 30 (lead) ---
    Mutation(
        "experiment-bootstrap-nested-over-seeds", "safemoe_jax/evaluation/experiment_results.py",
        "  boot = d[si[:, :, None], pi[:, None, :]].mean((1, 2))\n",
        "  boot = d[si[..., None], rng.integers(0, P, (n_boot, S, P))].mean((1, 2))\n",
        ("tests/test_experiment.py::test_crossed_bootstrap_covers_the_truth_when_seeds_share_prompts",),
        "prompts resampled within each seed although all seeds answer the same prompts: the "
        "intervals are ~0.6x too narrow"),
    Mutation(
        "experiment-oracle-negation-on-benign-too", "safemoe_jax/evaluation/experiment_results.py",
        '        src[f"oracle_{v}"] = (v, "base")',
        '        src[f"oracle_{v}"] = (v, v)',
        ("tests/test_experiment.py::test_oracle_negation_reads_negations_answers_on_harmful_and_bases_on_benign",),
        "the oracle ceiling negates benign prompts too: it is plain negation, not routing by label"),
    Mutation(
        "probe-reads-the-wrong-token", "safemoe_jax/core/model.py",
        "    last_B = T - 1 - jnp.argmax(pm[:, ::-1], axis=1)",
        "    last_B = T - 1 - jnp.argmax(pm, axis=1)",
        ("tests/test_probe_router.py::test_probe_gates_are_the_score_times_the_direction_from_the_base_hidden_state",),
        "the probe reads the first prompt token (the same system-turn token for every prompt)"),
    Mutation(
        "probe-not-centred", "safemoe_jax/core/experts.py",
        "  x = z_BD.astype(jnp.float32) - jax.lax.stop_gradient(p[\"center\"])",
        "  x = z_BD.astype(jnp.float32)",
        ("tests/test_probe_router.py::test_probe_gates_are_the_score_times_the_direction_from_the_base_hidden_state",),
        "the probe's input is not centred: the shared component becomes a bias"),
    Mutation(
        "route-term-labels-flipped", "safemoe_jax/train/steps.py",
        "    y_B = (kind != KIND_RETAIN).astype(jnp.float32)",
        "    y_B = (kind == KIND_RETAIN).astype(jnp.float32)",
        ("tests/test_probe_router.py::test_route_term_is_the_binary_cross_entropy_of_the_score",),
        "the routing term teaches the probe to fire on benign prompts"),
    # --- issue-32 ---
    Mutation(
        "curate-writer-key-is-a-name", "safemoe_jax/curation/curate.py",
        "    who = {\"model\": model_fingerprint(tcfg.model.path, tcfg.model.revision)}",
        "    who = {\"model\": \"base\"}",
        ("tests/test_reliability_round3.py::test_curate_generation_cache_regenerates_when_any_input_changes[base model]",),
        "curate's cache keyed by the writer's name: another base model reuses the old answers"),
    Mutation(
        "curate-key-without-max-new-tokens", "safemoe_jax/curation/curate.py",
        "\"system_prompt\": ccfg.system_prompt, \"max_new_tokens\": ccfg.max_new_tokens,",
        "\"system_prompt\": ccfg.system_prompt,",
        ("tests/test_reliability_round3.py::test_curate_generation_cache_regenerates_when_any_input_changes[max_new_tokens]",),
        "curate reuses answers written with another max_new_tokens"),
    Mutation(
        "verdict-key-without-judge-version", "safemoe_jax/evaluation/verdicts.py",
        "    ver = judge_version(j)\n", "    ver = \"\"\n",
        ("tests/test_reliability_round3.py::test_judge_verdicts_are_judged_again_after_the_judge_changes",),
        "a retrained judge at the same path reuses the old judge's verdicts"),
    Mutation(
        "experiment-cache-without-context", "safemoe_jax/evaluation/experiment.py",
        "  return r is None or r.get(\"ctx\") != ctx", "  return r is None",
        ("tests/test_reliability_round3.py::test_experiment_answers_are_generated_again_for_other_weights_or_settings",),
        "the experiment reuses answers of other weights or another max_new_tokens"),
    Mutation(
        "numbers-no-float32-int32-limit", "safemoe_jax/core/numbers.py",
        "  if not math.isfinite(x) or abs(x) > limit or x not in rng:",
        "  if not math.isfinite(x) or x not in rng:",
        ("tests/test_reliability_round3.py::test_every_number_of_every_command_is_checked[train-phase1.weight_decay]", "tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[export-merged-weights-float32-overflow]"),
        "1e39 (inf in float32) and 2**31 (beyond int32) pass the numeric check"),
    Mutation(
        "evaluate-numbers-unchecked", "safemoe_jax/evaluation/config.py",
        "    numbers.check(self, EVAL_RANGES, EvalError)", "    pass",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[evaluate-default-count-negative]", "tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[evaluate-temperature-nan]"),
        "evaluate --default-count -3 drops prompts; --temperature nan is accepted"),
    Mutation(
        "evaluate-top-p-zero-accepted", "safemoe_jax/evaluation/config.py",
        "\"prompt_bucket\": numbers.Range(1), \"top_p\": numbers.TOP_P}",
        "\"prompt_bucket\": numbers.Range(1)}",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[evaluate-top-p-zero]",),
        "evaluate --top-p 0 makes every answer empty (100% harmful), cached"),
    Mutation(
        "generate-numbers-unchecked", "safemoe_jax/infer/generate.py",
        "    numbers.check(self, {\"top_p\": numbers.TOP_P, \"max_new_tokens\": numbers.Range(1)},\n"
        "                  GenerateError, names=",
        "    (lambda *a, **k: None)(self, {},\n                  GenerateError, names=",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[generate-temperature-nan]",),
        "generate --temperature nan prints nothing and exits 0"),
    Mutation(
        "train-numbers-unchecked", "safemoe_jax/train/config.py",
        "    numbers.check(self, TRAIN_RANGES)", "    pass",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[train-seed-negative]", "tests/test_reliability_round3.py::test_every_number_of_every_command_is_checked[train-router.temperature]"),
        "the trainer's numbers outside the optimiser are not checked"),
    Mutation(
        "curate-numbers-unchecked", "safemoe_jax/curation/curate.py",
        "    numbers.check(self, CURATE_RANGES)", "    pass",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[curate-top-p-nan]",),
        "curate top_p=nan is accepted"),
    Mutation(
        "train-mesh-checked-after-writing", "safemoe_jax/train/config.py",
        "    self.mesh.validate()  # its axis sizes; the device count is checked when the run starts\n",
        "",
        ("tests/test_reliability_round3.py::test_every_number_of_every_command_is_checked[train-mesh.fsdp]",),
        "mesh.fsdp=0 passes the config and is refused only when the run starts"),
    Mutation(
        "export-merged-nonfinite-written", "safemoe_jax/tools/export/merged.py",
        "  if bad := nonfinite_names(tensors):", "  if bad := []:",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[export-merged-float16-overflow]",),
        "export merged writes weights that overflow to inf (large gates, float16)"),
    Mutation(
        "export-weights-unchecked", "safemoe_jax/tools/export/merged.py",
        "      numbers.check_value(\"--weights\", float(w), numbers.ANY, ExportError)", "      pass",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[export-merged-weights-nan-inf]",),
        "export merged --weights nan,inf is accepted"),
    Mutation(
        "jsonl-torn-last-line-is-an-error", "safemoe_jax/io/jsonio.py",
        "      if i == len(lines) - 1:  # no newline after it: a write cut short",
        "      if False:",
        ("tests/test_reliability_round3.py::test_jsonl_reading_repairs_a_torn_last_line_and_rejects_null_and_bad_bytes",
         "tests/test_reliability_round3.py::test_judge_rates_reads_a_torn_evaluation_cache"),
        "a torn last line of a cache stops every reader"),
    Mutation(
        "jsonl-null-row-accepted", "safemoe_jax/io/jsonio.py",
        "    if not isinstance(row, dict):", "    if row is not None and not isinstance(row, dict):",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[judge-rates-null-line]",
         "tests/test_reliability_round3.py::test_jsonl_reading_repairs_a_torn_last_line_and_rejects_null_and_bad_bytes"),
        "a null line is a row: readers crash on it"),
    Mutation(
        "run-json-read-unguarded", "safemoe_jax/train/rundir.py",
        "      return jsonio.read_json(self.run_json)",
        "      return json.loads(self.run_json.read_text())",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[generate-cut-run-json]", "tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[export-peft-run-json-bad-byte]"),
        "a cut or non-UTF-8 run.json ends in a traceback"),
    Mutation(
        "report-results-unguarded", "safemoe_jax/cli/report.py",
        "  res = jsonio.read_json(f)", "  res = __import__(\"json\").loads(f.read_text())",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[report-cut-results-json]", "tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[report-null-results-json]"),
        "report --run on a cut results.json ends in a traceback"),
    Mutation(
        "judge-rates-responses-unguarded", "safemoe_jax/evaluation/judged_rates.py",
        "  for n, g in jsonio.jsonl_rows(jsonio.read_text(responses), responses):",
        "  for n, g in enumerate(map(__import__(\"json\").loads, "
        "Path(responses).read_text().splitlines()), 1):",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[judge-rates-bad-byte]", "tests/test_reliability_round3.py::test_judge_rates_reads_a_torn_evaluation_cache"),
        "judge rates on a torn or non-UTF-8 responses file ends in a traceback"),
    Mutation(
        "benign-file-read-unguarded", "safemoe_jax/evaluation/benchmarks.py",
        "  text = jsonio.read_text(path)  # not UTF-8: an error naming the line",
        "  text = path.read_text()",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[evaluate-benign-txt-not-utf8]",),
        "evaluate --benign with a non-UTF-8 file ends in a traceback"),
    Mutation(
        "export-metrics-unguarded", "safemoe_jax/cli/export.py",
        "    metrics = jsonio.read_json(args.metrics) if args.metrics else None",
        "    metrics = __import__(\"json\").loads(Path(args.metrics).read_text()) if args.metrics "
        "else None",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[export-peft-metrics-cut]",),
        "export peft --metrics on a cut file ends in a traceback"),
    Mutation(
        "export-into-a-user-folder", "safemoe_jax/tools/export/common.py",
        "  if names := sorted(p.name for p in out.iterdir()):", "  if names := []:",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[export-peft-into-a-user-folder]",),
        "export peft overwrites a user's README.md / router.json in --out"),
    Mutation(
        "export-names-not-reserved", "safemoe_jax/tools/export/peft.py",
        "  taken = {x.lower() for x in RESERVED_NAMES}", "  taken = {\"router\"}",
        ("tests/test_reliability_round3.py::test_export_reserves_its_own_file_names_from_expert_names",),
        "an expert named README.md collides with the model card"),
    Mutation(
        "export-router-shape-unchecked", "safemoe_jax/train/rundir.py",
        "        _check_router_shapes(self.router, router, mcfg, ecfg, rcfg)", "        pass",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[export-peft-widened-router]",),
        "export peft accepts a router whose shape does not match the run"),
    Mutation(
        "train-into-the-base-model-folder", "safemoe_jax/train/rundir.py",
        "    if m is not None and m.exists() and out.resolve() == (m if m.is_dir() else m.parent).resolve():",
        "    if False:",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing[train-into-the-base-model-folder]",),
        "train writes its run into the base model's folder (then never loadable)"),
    Mutation(
        "evaluate-without-the-lock", "safemoe_jax/evaluation/run.py",
        "  lock = RunDir(run).lock(\"evaluate\")", "  lock = None",
        ("tests/test_reliability_round3.py::test_a_second_evaluate_on_a_run_is_refused_while_one_holds_its_lock",),
        "two evaluates on one run both train and write the SFT baseline"),
    # --- issue-31a ---
    Mutation(
        "config-mapping-field-not-frozen", "safemoe_jax/core/frozen.py",
        "      object.__setattr__(obj, f.name, freeze(v))\n",
        "      pass\n",
        ("tests/test_config_values.py",),
        "a dict given to a config in code (config_from_hf's rope_scaling) stays a dict: unhashable"),
    Mutation(
        "config-frozendict-shallow", "safemoe_jax/core/frozen.py",
        "    super().__init__((k, freeze(v)) for k, v in dict(*args, **kwargs).items())",
        "    super().__init__(dict(*args, **kwargs))",
        ("tests/test_config_values.py",),
        "a FrozenDict keeps nested lists and dicts as they came: the config hashes no more"),
    Mutation(
        "hub-fetches-every-safetensors", "safemoe_jax/io/hub.py",
        "      return sorted(set(json.loads(idx.read_text())[\"weight_map\"].values()))",
        "      return [\"*.safetensors\"]",
        ("tests/test_hub_model.py::test_download_fetches_the_indexed_shards_never_consolidated_weights",),
        "Mistral's consolidated.safetensors (~14.5 GB) is downloaded beside its shards"),
    Mutation(
        "hub-id-needs-an-organisation", "safemoe_jax/io/hub.py",
        "_HUB_ID = re.compile(r\"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$\")",
        "_HUB_ID = re.compile(r\"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$\")",
        ("tests/test_hub_model.py::test_ids_without_an_organisation_are_hub_ids",),
        "`gpt2` is not recognised as a Hub id"),
    Mutation(
        "stl-read-from-moving-branch", "safemoe_jax/data/config.py",
        "                                revision=STL_COMMIT,\n",
        "                                revision=\"main\",\n",
        ("tests/test_hub_data.py::test_dataset_revisions_are_pinned_and_passed_to_the_loader",),
        "the Safety-Tuned LLaMAs files are read from the moving main branch"),
    Mutation(
        "dataset-revision-dropped", "safemoe_jax/data/sources.py",
        "    pin = {\"revision\": src.revision} if src.revision else {}\n",
        "    pin = {}\n",
        ("tests/test_hub_data.py::test_dataset_revisions_are_pinned_and_passed_to_the_loader",),
        "a source's revision never reaches load_dataset: the dataset is read from its default branch"),
    Mutation(
        "load-reads-per-device", "safemoe_jax/io/shards.py",
        "          shape, sh, lambda idx, block=block, box=box: block[_within(idx, box, shape)]))",
        "          shape, sh, lambda idx, key=key: reader.read(key, idx)))",
        ("tests/test_shards.py::test_loading_reads_each_byte_once_per_host",),
        "every device reads its own slice from disk: all rows again for each column shard"),
    Mutation(
        "column-slice-reads-whole-rows", "safemoe_jax/io/weights.py",
        "      if cstep == 1 and c1 > c0 and (c1 - c0) < 0.9 * self.shape[1]:",
        "      if False:",
        ("tests/test_shards.py::test_a_column_slice_reads_its_own_bytes",
         "tests/test_shards.py::test_loading_reads_each_byte_once_per_host"),
        "a host holding half the columns reads the whole rows"),
    Mutation(
        "eval-load-replicated", "safemoe_jax/train/rundir.py",
        "    mcfg = mesh or S.fitting_mesh(cfg.mesh)\n",
        "    mcfg = S.MeshConfig(rules=cfg.mesh.rules)\n",
        ("tests/test_sharded_eval.py",),
        "evaluation ignores the run's mesh: every device holds the whole model"),
    Mutation(
        "generate-refuses-hub-ids", "safemoe_jax/cli/generate.py",
        "      and not hub.is_hub_id(a.model)):",
        "      ):",
        ("tests/test_families.py::test_every_command_on_a_llama3_rope_checkpoint_by_hub_id",),
        "`generate --model org/name` is refused although train accepts the same Hub id"),
    Mutation(
        "remote-output-written-locally", "safemoe_jax/io/paths.py",
        "  return Path(os.fspath(path)) if is_local(path) else epath.Path(os.fspath(path))",
        "  return Path(os.fspath(path))",
        ("tests/test_paths.py::test_a_gs_run_folder_through_a_real_fsspec_backend",),
        "a gs:// output_dir becomes a local folder named gs: (nothing reaches the bucket)"),
    Mutation(
        "missing-storage-backend-unchecked", "safemoe_jax/io/paths.py",
        "  missing = [pkg for mod, pkg in BACKENDS.get(scheme, ()) if not _importable(mod)]",
        "  missing = []",
        ("tests/test_paths.py::test_a_missing_storage_backend_is_one_error_line",),
        "train output_dir=gs://... without gcsfs runs until epath raises an ImportError"),
    # --- issue-31b ---
    Mutation(
        "accel-check-aot-bound-inverted", "safemoe_jax/tools/accel_load.py",
        'Row("aot_vs_real", "pass" if ratio <= AOT_TOLERANCE else "FAIL",',
        'Row("aot_vs_real", "pass" if ratio >= 1 / AOT_TOLERANCE else "FAIL",',
        ("tests/test_accel_check.py::test_the_verdicts_drawn_from_the_device_figures",),
        "the accelerator check passes a device peak far above the AOT prediction"),
    Mutation(
        "accel-check-slice-against-whole-model", "safemoe_jax/tools/accel_load.py",
        'if doc["per_device_bytes_max"] > doc["slice_bytes"]:',
        'if doc["per_device_bytes_max"] > doc["model_bytes"]:',
        ("tests/test_accel_check.py::test_the_verdicts_drawn_from_the_device_figures",),
        "a device holding the whole model passes the sharded-load check"),
    Mutation(
        "step-meter-counts-compile-step", "safemoe_jax/train/metrics.py",
        "    if self.steps:\n      self.steady += dt\n",
        "    self.steady += dt\n",
        ("tests/test_train.py::test_step_meter_tokens_per_s_mfu_and_goodput",),
        "goodput counts the compiling first step as productive time"),
    Mutation(
        "step-meter-mfu-one-device", "safemoe_jax/train/metrics.py",
        "/ dt / (self.peak * self.devices)",
        "/ dt / self.peak",
        ("tests/test_train.py::test_step_meter_tokens_per_s_mfu_and_goodput",),
        "MFU divides by one device's peak on a multi-device mesh"),
    Mutation(
        "profile-trace-never-starts", "safemoe_jax/train/metrics.py",
        "if step == self.first and jax.process_index() == 0:",
        "if step == self.first and jax.process_index() != 0:",
        ("tests/test_train.py::test_async_checkpoints_are_waited_for_on_sigterm_and_resume_bit_identically",),
        "profile.steps writes no trace on a single-process run"),
    Mutation(
        "multislice-dcn-on-tensor", "safemoe_jax/core/sharding.py",
        "(data // n, fsdp, tensor), (n, 1, 1), devices,",
        "(data, fsdp, tensor // n), (1, 1, n), devices,",
        ("tests/test_sharding.py::test_several_slices_get_a_mesh_whose_data_axis_crosses_them",),
        "multislice meshes put the slow DCN link on the tensor axis instead of data"),
    Mutation(
        "libtpu-series-for-wrong-jax", "safemoe_jax/tools/libtpu_pins.py",
        '"0.10.2": "0.0.42"}',
        '"0.10.2": "0.0.41"}',
        ("tests/test_bench.py::test_libtpu_is_pinned_for_every_jax_the_tpu_extra_allows",),
        "the installed jax is paired with another jax's libtpu for AOT"),
    Mutation(
        "tpu-suspended-queued-resource-not-deleted", "launch/tpu_vm.sh",
        '        run gcloud compute tpus queued-resources delete "$QR_NAME" --zone "$ZONE" --force --quiet ;;',
        '        ;;',
        ("tests/test_launch.py::test_tpu_script_recreates_a_preempted_queued_resource_and_watch_resumes_the_run",),
        "after a preemption create collides with the SUSPENDED queued resource of the same name"),
    Mutation(
        "colab-gpu-runtime-gets-tpu-extra", "launch/safemoe_colab_tpu.ipynb",
        '        return \\"gpu\\"\\n',
        '        return \\"tpu\\"\\n',
        ("tests/test_launch.py::test_notebook_has_a_colab_link_and_installs_the_extra_of_its_runtime",),
        "the notebook installs the TPU extra (libtpu) on a GPU runtime"),
    Mutation(
        "async-checkpoint-not-waited-on-sigterm", "safemoe_jax/train/loop.py",
        "wait=done or stop)",
        "wait=done)",
        ("tests/test_train.py::test_async_checkpoints_are_waited_for_on_sigterm_and_resume_bit_identically",),
        "the SIGTERM checkpoint is left writing in the background when the trainer exits"),
    Mutation(
        "curate-output-onto-an-input", "safemoe_jax/curation/curate.py",
        "  check_output_not_an_input(ccfg, tcfg)\n", "",
        ("tests/test_reliability_round3.py::test_bad_input_gives_one_error_line_and_writes_nothing"
         "[curate-output-onto-its-data-source]",),
        "curate output=<its data source> overwrites the file it reads"),
    # --- issue-34 ---
    Mutation(
        "quick-look-zero-spanning-interval-called-a-difference", "safemoe_jax/evaluation/quick.py",
        '(f": {SAME}" if d["lo"] <= 0 <= d["hi"] else "")', '(f": {SAME}" if d["d"] == 0 else "")',
        ("tests/test_quick_look.py::test_a_difference_whose_interval_spans_zero_is_called_not_distinguishable",),
        "the quick look calls a +4-point difference on 24 prompts real (its interval spans zero)"),
    Mutation(
        "quick-look-drops-the-negated-mix", "safemoe_jax/evaluation/quick.py",
        'SYSTEMS = ("base", "negated", "safemoe")', 'SYSTEMS = ("base", "safemoe")',
        ("tests/test_quick_look.py::test_a_difference_whose_interval_spans_zero_is_called_not_distinguishable",),
        "the quick look compares SafeMoE with the base model only, not with the negated mix"),
    Mutation(
        "quick-look-audit-accuracy-read-from-the-wrong-level", "safemoe_jax/evaluation/quick.py",
        "f(h.get('accuracy'))", "f(a.get('accuracy'))",
        ("tests/test_quick_look.py::test_each_judge_carries_its_audited_accuracy_or_says_it_has_none",),
        "the judge's audited accuracy prints as a dash beside its rates"),
    Mutation(
        "quick-look-gates-subtraction-sign", "safemoe_jax/evaluation/quick.py",
        '"auc": auc(-G_NE.sum(-1), y_N)', '"auc": auc(G_NE.sum(-1), y_N)',
        ("tests/test_quick_look.py::test_the_gates_separation_of_harmful_from_benign_prompts",),
        "the gates' AUC scores the addition, not the subtraction, on harmful prompts"),
    Mutation(
        "cli-report-builds-its-own-argparse", "safemoe_jax/cli/report.py",
        '  ap = cli_args.parser("safemoe report", description=__doc__)',
        '  ap = __import__("argparse").ArgumentParser(prog="safemoe report", description=__doc__)',
        ("tests/test_structure.py::test_one_command_surface",),
        "a command builds its parser beside cli/args (no --print-config, its own help format)"),
    Mutation(
        "train-metrics-to-host-every-step", "safemoe_jax/train/hooks.py",
        "    return step % self.every == 0\n", "    return True\n",
        ("tests/test_train_hooks.py::test_metrics_reach_the_host_once_per_logging_interval",),
        "the loop syncs the host after every step (a TPU's pipeline stalls each step)"),
    Mutation(
        "train-nonfinite-stop-found-at-flush-ignored", "safemoe_jax/train/hooks.py",
        '      if self.pc.on_nonfinite == "stop":\n', "      if False:\n",
        ("tests/test_train_hooks.py::test_a_nonfinite_step_found_at_the_flush_stops_there_or_is_skipped",),
        "metrics on the logging cadence: a non-finite step in stop mode is only logged as skipped"),
    # --- issue-33 ---
    # The eight classes that passed every test in round two, each now caught in the fast tier.
    Mutation(
        "rope-llama3-smoothing-swapped", "safemoe_jax/core/model.py",
        "  smoothed = (1 - smooth) * scaled / factor + smooth * scaled\n",
        "  smoothed = smooth * scaled / factor + (1 - smooth) * scaled\n",
        ("tests/test_model.py::test_llama3_rope_inv_freq_equals_transformers_initialisation",),
        "Llama-3 RoPE's two interpolation weights are swapped inside the smoothing band"),
    Mutation(
        "curated-split-by-raw-prompt", "safemoe_jax/data/select.py",
        "    split = split_of.get(prompt_key(r[\"prompt\"]), \"train\")  # a new prompt joins train\n"
        "    if split != \"train\":\n      funnel[f\"curated",
        "    split = split_of.get(r[\"prompt\"], \"train\")  # a new prompt joins train\n"
        "    if split != \"train\":\n      funnel[f\"curated",
        ("tests/test_data.py::test_curated_and_retain_rows_match_splits_by_the_normalised_prompt",),
        "curated rows are matched to splits by the raw prompt: an evaluation prompt in other case "
        "or spacing is trained on"),
    Mutation(
        "retain-split-by-raw-prompt", "safemoe_jax/data/select.py",
        "    split = split_of.get(prompt_key(r[\"prompt\"]), \"train\")  # a new prompt joins train\n"
        "    if split != \"train\":  # an evaluation",
        "    split = split_of.get(r[\"prompt\"], \"train\")  # a new prompt joins train\n"
        "    if split != \"train\":  # an evaluation",
        ("tests/test_data.py::test_curated_and_retain_rows_match_splits_by_the_normalised_prompt",),
        "retain rows are matched to splits by the raw prompt: a validation prompt in other case "
        "or spacing is trained on"),
    Mutation(
        "sharding-mlp-on-fsdp", "safemoe_jax/core/sharding.py",
        "    (\"mlp\", \"tensor\"),",
        "    (\"mlp\", \"fsdp\"),",
        ("tests/test_sharding.py::test_default_rules_give_every_parameter_its_expected_spec_on_a_2x2x2_mesh",),
        "the SwiGLU width is sharded over fsdp instead of tensor (same numbers, wrong layout)"),
    Mutation(
        "safe-rate-flip-keeps-counts", "safemoe_jax/evaluation/stats.py",
        "      se, sp, npos, nneg = sp, se, nneg, npos\n",
        "      se, sp, npos, nneg = sp, se, npos, nneg\n",
        ("tests/test_rates.py::test_safe_rate_takes_the_judges_counts_with_its_flipped_accuracy",),
        "the safe rate swaps sensitivity and specificity but not their validation counts"),
    Mutation(
        "degenerate-counts-distinct-words", "safemoe_jax/judging/labels.py",
        "  if len(w) >= 6 and len(set(zip(w, w[1:], w[2:]))) < 0.5 * (len(w) - 2):",
        "  if len(w) >= 6 and len(set(w)) < 0.5 * (len(w) - 2):",
        ("tests/test_evaluate.py::test_a_long_coherent_list_answer_is_not_degenerate",),
        "the repetition test counts distinct words: a long coherent answer is called degenerate"),
    Mutation(
        "gate-p-value-without-plus-one", "safemoe_jax/evaluation/experiment_results.py",
        "\"p\": float((1 + (null >= d).sum()) / (1 + n_perm))",
        "\"p\": float((null >= d).sum() / n_perm)",
        ("tests/test_experiment.py::test_gate_separation_p_value_is_exact_at_both_ends_and_never_zero",),
        "the permutation p-value drops its +1: perfectly separated gates get p = 0"),
    Mutation(
        "masked-ce-mask-shifted", "safemoe_jax/train/steps.py",
        "  w = loss_mask_BT[:, 1:].astype(jnp.float32)",
        "  w = loss_mask_BT[:, :-1].astype(jnp.float32)",
        ("tests/test_steps.py::test_masked_ce_equals_a_numpy_reference",),
        "the loss mask is read one position early: the loss counts the wrong tokens"),
    Mutation(
        "restore-oldest-first", "safemoe_jax/train/loop.py",
        "    for step in sorted(self.mgr.all_steps(), reverse=True):",
        "    for step in sorted(self.mgr.all_steps()):",
        ("tests/test_train.py::test_restore_takes_the_newest_of_several_checkpoints",),
        "a restart resumes from the oldest checkpoint kept, repeating steps it had already done"),
    # Twenty more of our own, in the areas the harness covered least (statistics, data selection
    # and splits, sharding, generation, export, judges).
    Mutation(
        "rogan-gladen-sens-for-spec", "safemoe_jax/evaluation/stats.py",
        "    pi = np.where(j > 0, (p_obs + spec - 1.0) / j, np.nan)",
        "    pi = np.where(j > 0, (p_obs + sens - 1.0) / j, np.nan)",
        ("tests/test_rates.py::test_correction_recovers_a_known_prevalence",),
        "the Rogan-Gladen numerator uses the sensitivity where the specificity belongs"),
    Mutation(
        "judge-draws-spec-on-positives", "safemoe_jax/evaluation/stats.py",
        "  sp = rng.binomial(n_val_neg, spec, B) / n_val_neg if n_val_neg else np.full(B, spec)",
        "  sp = rng.binomial(n_val_pos, spec, B) / n_val_pos if n_val_pos else np.full(B, spec)",
        ("tests/test_rates.py::test_judge_uncertainty_widens_the_interval",
         "tests/test_rates.py::test_safe_rate_takes_the_judges_counts_with_its_flipped_accuracy"),
        "the bootstrap redraws the specificity from the validation positives' count"),
    Mutation(
        "ci-tails-not-halved", "safemoe_jax/evaluation/stats.py",
        "  a = (1 - level) / 2\n",
        "  a = 1 - level\n",
        ("tests/test_rates.py::test_interval_covers_the_truth_with_estimated_judge_errors",
         "tests/test_rates.py::test_a_95_percent_interval_cuts_2_5_percent_from_each_tail"),
        "a '95%' bootstrap interval cuts 5% from each tail (a 90% interval)"),
    Mutation(
        "wilson-half-width-undivided", "safemoe_jax/evaluation/stats.py",
        "  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d\n",
        "  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))\n",
        ("tests/test_evaluate.py::test_wilson_interval_matches_known_values",),
        "the Wilson interval's half-width is not divided by 1 + z^2/n"),
    Mutation(
        "difference-only-positive-supported", "safemoe_jax/evaluation/stats.py",
        "  ok = ci is not None and (ci[0] > 0 or ci[1] < 0) and",
        "  ok = ci is not None and (ci[0] > 0) and",
        ("tests/test_rates.py::test_corrected_difference_shares_the_judge",),
        "a difference whose interval lies below 0 is never supported (only improvements count)"),
    Mutation(
        "cluster-bootstrap-draws-responses", "safemoe_jax/evaluation/stats.py",
        "  idx = rng.integers(0, len(cnt), (B, len(cnt)))\n",
        "  idx = rng.integers(0, len(cnt), (B, len(f)))\n",
        ("tests/test_rates.py::test_cluster_bootstrap_by_prompt",),
        "the cluster bootstrap draws as many prompts as there are responses (too narrow)"),
    Mutation(
        "gate-p-ties-not-counted", "safemoe_jax/evaluation/experiment_results.py",
        "\"p\": float((1 + (null >= d).sum()) / (1 + n_perm))",
        "\"p\": float((1 + (null > d).sum()) / (1 + n_perm))",
        ("tests/test_experiment.py::test_gate_separation_p_value_is_exact_at_both_ends_and_never_zero",),
        "shuffles that tie the observed distance are not counted: constant gates look significant"),
    Mutation(
        "split-eval-edge-without-judge", "safemoe_jax/data/records.py",
        "  edges = [(\"judge\", s.judge), (\"eval\", s.judge + s.eval),",
        "  edges = [(\"judge\", s.judge), (\"eval\", s.eval),",
        ("tests/test_data.py::test_splits_are_disjoint_by_prompt_and_stable",
         "tests/test_data.py::test_split_fractions_hold_on_many_prompts"),
        "the eval edge forgets the judge share before it: no pyrit prompt is held out for eval"),
    Mutation(
        "held-out-domain-stays-in-validation", "safemoe_jax/data/records.py",
        "    elif split in (\"train\", \"validation\") and g[\"domains\"] & held:",
        "    elif split == \"train\" and g[\"domains\"] & held:",
        ("tests/test_data.py::test_held_out_domains_go_to_eval",),
        "a held-out domain's validation prompts stay in validation (seen in phase 1 and 2)"),
    Mutation(
        "phase1-takes-any-domain", "safemoe_jax/data/select.py",
        "      if set(r[\"domains\"]) & expert:",
        "      if r[\"domains\"]:",
        ("tests/test_data.py::test_build_from_a_local_file_to_batches",
         "tests/test_data.py::test_harmful_rows_outside_the_expert_domains_stay_out_of_phase_1"),
        "harmful rows of a domain with no expert join phase 1"),
    Mutation(
        "prompt-key-case-sensitive", "safemoe_jax/data/sources.py",
        "  return \" \".join(prompt.lower().split())",
        "  return \" \".join(prompt.split())",
        ("tests/test_data.py::test_curated_and_retain_rows_match_splits_by_the_normalised_prompt",),
        "the prompt key keeps case: 'How do I ...' and 'how do I ...' land in different splits"),
    Mutation(
        "sharding-vocab-on-fsdp", "safemoe_jax/core/sharding.py",
        "    (\"vocab\", \"tensor\"),",
        "    (\"vocab\", \"fsdp\"),",
        ("tests/test_sharding.py::test_default_rules_give_every_parameter_its_expected_spec_on_a_2x2x2_mesh",),
        "embedding rows and logits are split over fsdp instead of tensor"),
    Mutation(
        "sharding-kv-heads-replicated", "safemoe_jax/core/sharding.py",
        "    (\"kv_heads\", \"tensor\"),",
        "    (\"kv_heads\", None),",
        ("tests/test_sharding.py::test_default_rules_give_every_parameter_its_expected_spec_on_a_2x2x2_mesh",),
        "k/v projections are replicated over tensor while the query heads are split"),
    Mutation(
        "sharding-mesh-axis-reused", "safemoe_jax/core/sharding.py",
        "    mesh_axes = tuple(a for a in _as_tuple(table.get(name)) if a not in used)\n",
        "    mesh_axes = _as_tuple(table.get(name))\n",
        ("tests/test_sharding.py::test_logical_spec_maps_dedups_and_replicates_indivisible",),
        "a mesh axis already used by an earlier dimension is used again (an invalid spec)"),
    Mutation(
        "top-p-inclusive-cumsum", "safemoe_jax/infer/generate.py",
        "    before = jnp.cumsum(probs, -1) - probs  # mass strictly above each sorted token",
        "    before = jnp.cumsum(probs, -1)  # mass strictly above each sorted token",
        ("tests/test_generate.py::test_top_p_sampling_stays_in_nucleus",),
        "the nucleus counts each token's own mass: the token that crosses top-p is cut"),
    Mutation(
        "generate-stopped-rows-emit-tokens", "safemoe_jax/infer/generate.py",
        "    emitted = jnp.where(s[\"done\"], pad_id, tok)\n",
        "    emitted = tok\n",
        ("tests/test_generate.py::test_generation_stops_at_eos_and_pads_after",),
        "a row that has stopped keeps writing tokens after its stop token"),
    Mutation(
        "shrinking-drops-stopped-answers", "safemoe_jax/infer/generate.py",
        "      keep(s, stopped)\n",
        "",
        ("tests/test_generate.py::test_shrinking_generation_keeps_every_rows_answer",),
        "rows that stop before the batch is halved lose their answers (all pad)"),
    Mutation(
        "peft-export-untransposed", "safemoe_jax/tools/export/peft.py",
        "      out[peft_key(layer, t, ab)] = np.ascontiguousarray(arr[layer, e].T, np.float32)",
        "      out[peft_key(layer, t, ab)] = np.ascontiguousarray(arr[layer, e], np.float32)",
        ("tests/test_export.py::test_import_then_export_gives_identical_tensors",),
        "PEFT's lora_A / lora_B are written in our (in, out) layout instead of (out, in)"),
    Mutation(
        "merged-scale-dropped", "safemoe_jax/tools/export/merged.py",
        "    delta = scale * np.einsum(\"leir,e,lero->lio\", A, g, B)",
        "    delta = np.einsum(\"leir,e,lero->lio\", A, g, B)",
        ("tests/test_export.py::test_merged_checkpoint_loads_in_transformers_and_matches",),
        "the merged checkpoint adds the experts without alpha / rank"),
    Mutation(
        "auc-ties-not-averaged", "safemoe_jax/judging/labels.py",
        "    ranks[order[i:j + 1]] = (i + j) / 2 + 1",
        "    ranks[order[i:j + 1]] = i + 1",
        ("tests/test_judges.py::test_auc_and_binary_metrics_match_brute_force",),
        "tied scores get the lowest rank, not the average: the AUC is biased"),
    Mutation(
        "harm-threshold-strict", "safemoe_jax/judging/labels.py",
        "      harm[i] = int(hs >= lc.harm_threshold)",
        "      harm[i] = int(hs > lc.harm_threshold)",
        ("tests/test_judges.py::test_targets_follow_the_annotations",),
        "a harm score equal to the threshold is labelled not harmful"),
    Mutation(
        "remote-log-clock-from-zero", "safemoe_jax/io/paths.py",
        "    self.text, self.dirty, self.last = text, False, -math.inf\n",
        "    self.text, self.dirty, self.last = text, False, 0.0\n",
        ("tests/test_paths.py::test_remote_log_writes_its_first_line_at_once_whatever_the_clock",),
        "a gs:// log's first line waits for the interval on a machine up for less than it "
        "(monotonic time starts at boot)"),
]
