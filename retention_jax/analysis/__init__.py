"""Frontiers, the paper's figures and the theory, from a work directory; nothing here trains.

Modules: results (load rows, name methods), frontier (Pareto sets and their comparison),
report (text tables, λ curves), figures (Figs. 2-4), paper (Fig. 3 numbers), theory
(section 5), synthetic (a known results table for tests and demos).
"""
