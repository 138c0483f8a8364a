from .cond import Cond

__all__ = ["Cond"]
