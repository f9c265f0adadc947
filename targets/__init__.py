"""legoc.targets"""
