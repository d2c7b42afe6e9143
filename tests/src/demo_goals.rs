//! The demo's customer-support goals (`agentfleet-demo`), also run by the prompt-caching bench.

/// A customer request: a short label for the table and the message the agent gets.
pub struct Goal {
    /// A short label.
    pub label: &'static str,
    /// The message.
    pub text: &'static str,
}

/// Realistic support requests. Refunds and requests for a person are meant to be escalated.
pub const GOALS: &[Goal] = &[
    Goal {
        label: "Password reset",
        text: "I forgot my password and the reset email never arrives. Can you help me get back into my account?",
    },
    Goal {
        label: "Invoice seat count",
        text: "Question about invoice INV-2291: why were we charged for 12 seats when we only have 9 users? \
               My email is dana.reyes@northwind.example.",
    },
    Goal {
        label: "API 500 errors",
        text: "Since this morning our integration gets HTTP 500 errors from POST /v2/orders (request id \
               req_8f2c41). Is something wrong on your side?",
    },
    Goal {
        label: "Plan upgrade",
        text: "We would like to upgrade from Starter to Pro in the middle of our billing cycle. How is the \
               price prorated? I am ops@brightpath.example.",
    },
    Goal {
        label: "Refund request",
        text: "I was billed twice this month for the same subscription and I want a refund for the duplicate \
               charge.",
    },
    Goal {
        label: "Wants a person",
        text: "This is the third time I am writing about the same problem. Please let me talk to a human.",
    },
    Goal {
        label: "Outage report",
        text: "The dashboard has been unreachable for 20 minutes in eu-west; every page times out. Is there \
               an outage?",
    },
    Goal {
        label: "Two-factor for org",
        text: "How do I require two-factor authentication for everyone in my organisation?",
    },
    Goal {
        label: "Rate limited (429)",
        text: "Your API keeps answering 429 Too Many Requests although we are far below our quota. \
               Account: lee@fastfreight.example.",
    },
    Goal {
        label: "Billing address",
        text: "Please change the billing address on our future invoices to our new office: 12 Rue de la \
               Republique, 69002 Lyon, France.",
    },
    Goal {
        label: "Angry, wants manager",
        text: "I am very unhappy with how our outage was handled last week. I want to speak to your manager \
               about our contract.",
    },
    Goal {
        label: "Data export",
        text: "Can I export all my project data to CSV before we cancel our subscription? Contact: \
               sam.ortiz@lumen.example.",
    },
];
