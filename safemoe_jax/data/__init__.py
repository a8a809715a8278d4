"""The data: source readers, the record schema and prompt-disjoint splits, phase selection,
tokenisation and Grain batches, and the data card."""
