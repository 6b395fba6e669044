"""What both tasks' analyses share: linear probes of features (the knowledge gap) and the figure index page."""
