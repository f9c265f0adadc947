"""legoc.runtime"""
