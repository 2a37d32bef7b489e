"""What a run is measured against: the published numbers (paper.py), the ablation sweeps' summaries (ablation.py),
and the paper's Figures 1 (figure1.py), 3 and 4 (figures.py). Reports import the core; nothing in the core imports
them."""
