"""meal-ray: MEAL V2 ensemble distillation (Shen & Savvides, arXiv 2009.08453) with Ray Serve teachers and Ray Train
students."""

__version__ = "0.1.0"
