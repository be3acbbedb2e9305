"""`dinobatch serve`: the local web application (review in the browser, the app's endpoints).

Needs the optional extra dinobatch[serve]; nothing here is imported by other commands.
"""
