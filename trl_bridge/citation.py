"""The BRIDGE paper, as model cards and docs cite it."""

PAPER_TITLE = "Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning"
PAPER_AUTHORS = "Liang Chen, Xueting Han, Li Shen, Jing Bai, Kam-Fai Wong"
PAPER_URL = "https://arxiv.org/abs/2509.06948"

CITATION = """@inproceedings{chen2026bridge,
    title        = {{Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning}},
    author       = {Liang Chen and Xueting Han and Li Shen and Jing Bai and Kam-Fai Wong},
    booktitle    = {International Conference on Machine Learning (ICML)},
    year         = 2026,
    eprint       = {arXiv:2509.06948}
}"""
