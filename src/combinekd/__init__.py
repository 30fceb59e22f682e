"""combinekd: compact NMT students by Combinatorial Knowledge Distillation (Wu et al., EMNLP 2020)."""

__version__ = "0.1.0"
