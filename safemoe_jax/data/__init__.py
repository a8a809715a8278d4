"""Data: every source -> one record schema -> prompt-disjoint splits -> the two training sets and
the evaluation sets -> chat-formatted tokens with a response-only loss mask -> Grain batches.

Records (one per (prompt, response) pair; `records_to_dataset` gives a `datasets.Dataset`):
  {id: str, prompt: str, response: str ("" for prompt-only benchmarks), domains: [str],
   source: str ("a+b" when a duplicate pair came from two sources), labels: dict}
Standard labels (absent = unknown): harm_score float in [0, 1] (mean of harm_votes, the human
annotations), is_safe bool (BeaverTails / PKU-SafeRLHF response safety), refusal bool (human),
objective_achieved bool (pyrit objective CSVs), prompt_safe bool (XSTest prompt label); sources add
their own (categories, intents, severity, ...). Text is stripped; identical (prompt, response)
pairs are merged (annotations pooled, domains united) and counted in the card.

Splits are assigned per prompt (lower-cased, whitespace-collapsed), never per row:
  u = sha256(f"{seed}\\0{prompt}") / 2^64 -> judge [0, f_judge) | eval | validation | train,
so a prompt and all its responses land in exactly one split, stably across runs, machines and
source order. Sources with role "eval" (benchmarks) force their prompts into eval; prompts of a
held-out domain (zero-shot experiments) move from train/validation to eval. The `judge` split is
reserved for the safety judge (judging/), which trains on human-labelled rows: no row of a judge
prompt is ever used to train experts or router, nor is any eval prompt.

Phase 1 (experts): train/validation rows with a response, harmful (harm_score >= harmful_min_score,
else is_safe false, else objective_achieved if objective_is_harm), in an expert domain.
Phase 2 (router): train/validation rows that are safe (harm_score <= safe_max_score, else is_safe)
and informative: not a refusal (the human refusal label when the row has one, else garak's refusal
strings) and at least safe_min_response_chars long.

Batches (numpy, fixed shapes, right padding), with B the per-process batch:
  input_ids      int32 [B, T]  pad_id after the sequence
  attention_mask int32 [B, T]  1 = real token
  loss_mask      int32 [B, T]  1 where token t is a response token (its end-of-turn token
                               included); aligned with input_ids, so the loss of predicting token
                               t from position t-1 counts iff loss_mask[t] (steps.masked_ce uses
                               loss_mask[:, 1:] against input_ids[:, 1:])
  prompt_mask    int32 [B, T]  1 on the chat-formatted prompt tokens (per-sequence routing)
  domains        float32 [B, E] multi-hot over the ordered expert domains (oracle routing)
  example_index  int64 [B]     index into the phase's example list (-1 = padding row)
T is data.max_length ("pad"), or the smallest bucket length holding the batch ("bucket").
The Grain pipeline shuffles by seed (a new order each epoch), takes process `process_index`'s
rows of every global batch, and its iterator state (`get_state`/`set_state`) resumes exactly.
"""
