"""The dashboard's rows, one module each: ``section(layout)`` adds the row and its panels."""
