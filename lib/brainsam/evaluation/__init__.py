"""Accuracy and cost: the benchmark, its sessions, peers, reports and active learning."""
