"""Reusable widgets: charts with PNG/CSV saving, the heatmap, the Pareto chart, layer bars, the
scan settings form. May import studio.core and nothing else of studio.ui."""
