//! The kinds of account a connection reaches and a workflow writes to.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Salesforce,
    Hubspot,
    Http,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Salesforce => "salesforce",
            Provider::Hubspot => "hubspot",
            Provider::Http => "http",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "salesforce" => Ok(Provider::Salesforce),
            "hubspot" => Ok(Provider::Hubspot),
            "http" => Ok(Provider::Http),
            other => Err(format!(
                "unknown provider {other:?}: expected salesforce, hubspot or http"
            )),
        }
    }
}
