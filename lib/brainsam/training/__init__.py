"""Fine-tuning: training cases, simulated annotation and the trainer."""
