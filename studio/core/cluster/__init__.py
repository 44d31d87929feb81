"""Ray: the connection (one long-lived thread), sensitivity scans on Ray workers (registered as
the scan's ``ray`` strategy on import) and data-parallel fine-tuning on Ray Train.

May import every other stage. Importing :mod:`studio.core.cluster.scan` registers the Ray
scan strategy.
"""
