"""Qt front end of Pruning Studio (PySide6 + pyqtgraph + superqt). Only this package imports Qt."""
