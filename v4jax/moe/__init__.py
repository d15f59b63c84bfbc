"""Mixture of experts: DeepSeek routing, stacked experts with three grouped-matmul back ends, shared experts."""
